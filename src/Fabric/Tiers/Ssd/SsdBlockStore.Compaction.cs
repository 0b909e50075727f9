namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // Data-segment bytes (4 KiB-padded payloads) of the live blocks: what the data segments would hold with no dead payloads.
    private long _liveDataBytes;
    private Task? _compaction;
    private int _compacting;

    /// <summary>Why the last compaction stopped early, if it did; null when every run finished.</summary>
    public string? LastCompactionError { get; private set; }

    /// <summary>Data segments freed by compaction since opening.</summary>
    public int CompactedSegments => Volatile.Read(ref _compactedSegments);
    private int _compactedSegments;

    // Starts a background compaction when dead payloads exceed the slack and the oldest data segment can be freed.
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
                // A failure leaves every block where it was (the index moves only after a commit); the segments stay
                // longer than they should, which LastCompactionError tells an operator. Device errors also fault writes.
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
        lock (_lock)
        {
            long dead = _dataTail - _dataBegin - _liveDataBytes;
            return dead > (long)(_options.CapacityBytes * _options.CompactionSlack) && OldestSegmentSettledLocked();
        }
    }

    // The oldest data segment can be compacted once the tail has left it and no payload is still being written into it.
    private bool OldestSegmentSettledLocked()
    {
        long until = SegmentEnd(_dataBegin);
        return until <= _dataTail && (_dataInFlight.Count == 0 || _dataInFlight.Min >= until);
    }

    private long SegmentEnd(long address) => (address & ~(_options.SegmentBytes - 1)) + _options.SegmentBytes;

    /// <summary>
    /// Copies the live payloads of the oldest data segment to the data tail, appends their new references (each under the
    /// index lock, so it is ordered before any tombstone of its key), commits, repoints the index and deletes the segment;
    /// then truncates the log below the oldest live reference and commits again.
    /// </summary>
    internal async Task CompactOldestSegmentAsync()
    {
        long until;
        var victims = new List<(BlockKey Key, Entry Entry)>();
        lock (_lock)
        {
            if (!OldestSegmentSettledLocked())
                return;
            until = SegmentEnd(_dataBegin);
            foreach (var (key, entry) in _index)
            {
                if (entry.Address < until)
                    victims.Add((key, entry));
            }
        }
        var moved = new List<(BlockKey Key, Entry From, Entry To)>(victims.Count);
        foreach (var (key, entry) in victims)
        {
            using var buffer = _data.RentBuffer(entry.DataLength);
            await _data.ReadAlignedAsync(DataSegment(entry.Address), DataOffset(entry.Address), buffer, entry.DataLength).ConfigureAwait(false);
            long to;
            lock (_lock)
            {
                if (!_index.TryGetValue(key, out var now) || now != entry)
                    continue;
                if (entry.Header(key).ChecksumOf(buffer.Span(0, entry.StoredLength)) != entry.Checksum)
                {
                    DropLocked(key, entry); // corrupt: it would be served as such; it goes away with the segment
                    continue;
                }
                to = ReserveDataLocked(entry.StoredLength);
            }
            try
            {
                await _data.WriteAlignedAsync(DataSegment(to), DataOffset(to), buffer, entry.DataLength).ConfigureAwait(false);
                var refBytes = new SsdRefBytes();
                entry.Header(key).Write(refBytes, entry.Checksum);
                SsdRecordHeader.WriteRef(refBytes, ((ReadOnlySpan<byte>)refBytes)[..SsdRecordHeader.Size], to);
                while (true)
                {
                    long address;
                    lock (_lock)
                    {
                        if (!_index.TryGetValue(key, out var now) || now != entry)
                            break;
                        if (!_log.TryEnqueue(new SsdLogEntry(refBytes), out address))
                            address = -1;
                        else
                            _dirty = true;
                    }
                    if (address >= 0)
                    {
                        moved.Add((key, entry, entry with { Address = to, RefAddress = address }));
                        break;
                    }
                    await Task.Delay(1).ConfigureAwait(false); // the log's memory is full until a page flushes
                }
            }
            finally
            {
                lock (_lock)
                    _dataInFlight.Remove(to);
            }
        }
        await JoinCommit().ConfigureAwait(false);
        long oldestRef;
        lock (_lock)
        {
            foreach (var (key, from, to) in moved)
            {
                if (_index.TryGetValue(key, out var now) && now == from)
                    _index[key] = to;
            }
            // Every live block below `until` now has a committed reference to its copy; a block removed meanwhile has its
            // tombstone appended already. Nothing live points into the segment any more.
            _dataBegin = until;
            // Writers whose references are appended but not yet indexed (committed by the commit above or still in
            // flight) count too: their blocks are acknowledged once indexed and must be found by the next recovery.
            oldestRef = _log.TailAddress;
            foreach (var entry in _index.Values)
                oldestRef = Math.Min(oldestRef, entry.RefAddress);
            foreach (long floor in _refFloors.Values)
                oldestRef = Math.Min(oldestRef, floor);
        }
        for (int segment = DataSegment(until) - 1; segment >= 0 && File.Exists($"{_data.FileName}.{segment}"); segment--)
            _data.RemoveSegment(segment);
        lock (_lock)
        {
            _log.TruncateUntilPageStart(oldestRef);
            _dirty = true;
        }
        await JoinCommit().ConfigureAwait(false);
        Interlocked.Increment(ref _compactedSegments);
    }
}
