using System.Buffers;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // Record bytes (headers included) of the live blocks: what the log would hold with no dead records.
    private long _liveRecordBytes;
    private Task? _compaction;
    private int _compacting;

    /// <summary>Why the last compaction stopped early, if it did; null when every run finished.</summary>
    public string? LastCompactionError { get; private set; }

    /// <summary>Segments freed by compaction since opening.</summary>
    public int CompactedSegments => Volatile.Read(ref _compactedSegments);
    private int _compactedSegments;

    // Starts a background compaction when dead records exceed the slack and the oldest segment can be freed.
    private void MaybeStartCompaction()
    {
        if (_stopping || !NeedsCompaction() || Interlocked.Exchange(ref _compacting, 1) != 0)
            return;
        _compaction = Task.Run(async () =>
        {
            try
            {
                while (NeedsCompaction() && !_stopping && _fault is null)
                    await CompactOldestSegmentAsync().ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // A failure leaves every block where it was (the index moves only after a commit); the log stays longer
                // than it should, which LastCompactionError tells an operator. Device errors also fault writes.
                LastCompactionError = $"{e.GetType().Name}: {e.Message}";
            }
            finally
            {
                Volatile.Write(ref _compacting, 0);
            }
        });
    }

    /// <summary>Tests and shutdown: waits until no compaction is running.</summary>
    internal async Task WaitForCompactionAsync()
    {
        while (Volatile.Read(ref _compacting) != 0 && _compaction is { } running)
            await running.ConfigureAwait(false);
    }

    private bool NeedsCompaction()
    {
        long live;
        lock (_lock)
            live = _liveRecordBytes;
        long dead = _log.TailAddress - _log.BeginAddress - live;
        long segmentEnd = SegmentEnd(_log.BeginAddress);
        return dead > (long)(_options.CapacityBytes * _options.CompactionSlack) && segmentEnd <= _log.CommittedUntilAddress;
    }

    private long SegmentEnd(long address) => (address & ~(_options.SegmentBytes - 1)) + _options.SegmentBytes;

    /// <summary>
    /// Copies the live records of the oldest segment to the log's tail, then truncates the log past that segment (FASTER
    /// deletes the file). Each copy is appended under the index lock, so it is ordered before any tombstone of its key.
    /// </summary>
    internal async Task CompactOldestSegmentAsync()
    {
        long until = SegmentEnd(_log.BeginAddress);
        if (until > _log.CommittedUntilAddress)
            return;
        var victims = new List<(BlockKey Key, Entry Entry)>();
        lock (_lock)
        {
            foreach (var (key, entry) in _index)
            {
                if (entry.Address < until)
                    victims.Add((key, entry));
            }
        }
        var moved = new List<(BlockKey Key, Entry From, Entry To)>(victims.Count);
        foreach (var (key, entry) in victims)
        {
            var (owner, length) = await _log.ReadAsync(entry.Address, MemoryPool<byte>.Shared, entry.RecordLength).ConfigureAwait(false);
            using (owner)
            {
                var record = owner.Memory[..length];
                if (SsdRecordHeader.TryParse(record.Span, out _) is not { } header || header.Key != key || header.Kind != SsdRecordKind.Block)
                {
                    lock (_lock)
                    {
                        if (_index.TryGetValue(key, out var now) && now == entry)
                            DropLocked(key, entry); // corrupt: it would be served as such; it goes away with the segment
                    }
                    continue;
                }
                while (true)
                {
                    long address;
                    lock (_lock)
                    {
                        if (!_index.TryGetValue(key, out var now) || now != entry)
                            break;
                        if (!_log.TryEnqueue(new CopiedRecord(record), out address))
                            address = -1;
                    }
                    if (address >= 0)
                    {
                        moved.Add((key, entry, entry with { Address = address }));
                        break;
                    }
                    await Task.Delay(1).ConfigureAwait(false); // the log's memory is full until a page flushes
                }
            }
        }
        await JoinCommit().ConfigureAwait(false);
        lock (_lock)
        {
            foreach (var (key, from, to) in moved)
            {
                if (_index.TryGetValue(key, out var now) && now == from)
                    _index[key] = to;
            }
            _log.TruncateUntilPageStart(until);
            _dirty = true;
        }
        await JoinCommit().ConfigureAwait(false);
        Interlocked.Increment(ref _compactedSegments);
    }

    private readonly struct CopiedRecord(ReadOnlyMemory<byte> record) : FASTER.core.ILogEnqueueEntry
    {
        public int SerializedLength => record.Length;
        public void SerializeTo(Span<byte> dest) => record.Span.CopyTo(dest);
    }
}
