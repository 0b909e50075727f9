namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // Data-segment bytes (4 KiB-padded payloads) of the live blocks: what the data segments would hold with no dead payloads.
    private long _liveDataBytes;
    private Task? _compaction;
    private int _compacting;

    /// <summary>Why the last compaction stopped early, if it did; null when every run finished.</summary>
    public string? LastCompactionError { get; private set; }

    /// <summary>Data segments freed by compaction since opening (kept as spare files for new segments, up to the
    /// footprint the store reserved, or deleted).</summary>
    public int CompactedSegments => Volatile.Read(ref _compactedSegments);
    private int _compactedSegments;

    /// <summary>How many times in a row compaction may fail to read a record before it drops the record as lost.</summary>
    internal const int CompactionReadAttempts = 3;

    // Records compaction could not read (their consecutive failed attempts), under _lock. A read error that lasts would
    // otherwise stop compaction at the oldest segment for good: dead space would grow until the disk filled.
    // Each with its count and when the first of them happened (Environment.TickCount64).
    private readonly Dictionary<BlockKey, (int Attempts, long First)> _compactionReadFailures = new();

    /// <summary>Records compaction dropped because their segment could not be read back <see cref="CompactionReadAttempts"/>
    /// times in a row (the block is gone from this tier, as after a checksum failure).</summary>
    public int CompactionDroppedUnreadable => Volatile.Read(ref _compactionDroppedUnreadable);
    private int _compactionDroppedUnreadable;

    /// <summary>Tests: compaction runs started since opening.</summary>
    internal int CompactionRuns => Volatile.Read(ref _compactionRuns);
    private int _compactionRuns;

    // Starts a background compaction when dead payloads exceed the slack and the oldest data segment can be freed.
    private void MaybeStartCompaction()
    {
        if (_stopping || _fault is not null || !NeedsCompaction() || Interlocked.Exchange(ref _compacting, 1) != 0)
            return;
        Interlocked.Increment(ref _compactionRuns);
        _compaction = Task.Run(async () =>
        {
            bool failed = false;
            try
            {
                while (NeedsCompaction() && !_stopping && _fault is null)
                    await CompactOldestSegmentAsync().ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // A failure leaves every block readable (the index moves only to a copy on stable storage); the segments stay
                // longer than they should, which LastCompactionError tells an operator. Device errors also fault writes.
                // The next write or removal starts another run.
                LastCompactionError = $"{e.GetType().Name}: {e.Message}";
                failed = true;
            }
            finally
            {
                Volatile.Write(ref _compacting, 0);
            }
            // A removal that made compaction due while this run was deciding to stop saw it running and started none.
            // (Not right after a failure: that would retry at once, in a loop; MaybeStartCompaction checks the fault.)
            if (!failed)
                MaybeStartCompaction();
        });
    }

    /// <summary>Waits until no compaction is running (compaction starts by itself after writes and removals).</summary>
    public async Task WaitForCompactionAsync()
    {
        // The flag is set before the task is assigned: in between, _compaction is null or the previous (finished) run.
        while (Volatile.Read(ref _compacting) != 0)
        {
            if (_compaction is { IsCompleted: false } running)
                await running.ConfigureAwait(false);
            else
                await Task.Delay(1).ConfigureAwait(false);
        }
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

    // The block compaction is copying right now and the data address of its copy (under _lock): a removal meanwhile
    // cancels up to the copy too, so that the copy cannot come back at recovery.
    private (BlockKey Key, long To)? _copying;

    /// <summary>
    /// Copies the live records of the oldest data segment to the data tail (each copy sealed for its new address, durable
    /// when written), repoints the index, and deletes the segment (then syncs the directory, so that the deletion is
    /// durable before any tombstone of that segment leaves the log); then truncates the log below the first tombstone
    /// that still cancels something in a data segment, and commits.
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
        foreach (var (key, entry) in victims.OrderBy(v => v.Entry.Address))
        {
            using var buffer = _data.RentBuffer(entry.DataLength);
            try
            {
                await _data.ReadAlignedAsync(DataSegment(entry.Address), DataOffset(entry.Address), buffer, entry.DataLength).ConfigureAwait(false);
            }
            catch (IOException e)
            {
                // Unreadable: kept (a device may recover, as a read of it would hope), and this run ends; after
                // CompactionReadAttempts runs in a row the record is taken as lost, so that the segment can be freed.
                lock (_lock)
                {
                    if (!_index.TryGetValue(key, out var current) || current != entry)
                    {
                        _compactionReadFailures.Remove(key); // removed (or moved) meanwhile: nothing to copy
                        continue;
                    }

                    // Runs can follow each other within milliseconds (every write or removal starts one): the attempts
                    // must also span CompactionUnreadableGrace, so that a short burst of errors drops nothing.
                    var (before, first) = _compactionReadFailures.GetValueOrDefault(key, (0, Environment.TickCount64));
                    int attempts = before + 1;
                    _compactionReadFailures[key] = (attempts, first);
                    if (attempts < CompactionReadAttempts || Environment.TickCount64 - first < (long)_options.CompactionUnreadableGrace.TotalMilliseconds)
                    {
                        throw new IOException($"compaction could not read block {key} at data address {entry.Address} (attempt {attempts} of {CompactionReadAttempts}, "
                            + $"over at least {_options.CompactionUnreadableGrace.TotalSeconds:0.#} s, before it is dropped): {e.Message}", e);
                    }
                    _compactionReadFailures.Remove(key);
                    DropLocked(key, entry);
                    Interlocked.Increment(ref _compactionDroppedUnreadable);
                    LastCompactionError = $"block {key} at data address {entry.Address} could not be read {CompactionReadAttempts} times and was dropped: {e.Message}";
                }
                continue;
            }
            long to;
            lock (_lock)
            {
                _compactionReadFailures.Remove(key);
                if (!_index.TryGetValue(key, out var now) || now != entry)
                    continue;
                var payload = buffer.Span(SsdRecordHeader.SectorSize, entry.StoredLength);
                if (entry.Header(key).ChecksumOf(payload) != entry.Checksum)
                {
                    DropLocked(key, entry); // corrupt: it would be served as such; it goes away with the segment
                    continue;
                }
                to = ReserveDataLocked(entry.StoredLength);
                _copying = (key, to);
            }
            bool copied = false;
            try
            {
                var sector = buffer.WritableSpan(0, SsdRecordHeader.SectorSize);
                entry.Header(key).Write(sector, entry.Checksum);
                SsdRecordHeader.SealSector(sector, to, _storeKey);
                try
                {
                    await _data.WriteAlignedAsync(DataSegment(to), DataOffset(to), buffer, entry.DataLength).ConfigureAwait(false);
                }
                catch (IOException e) when (DirectFileDevice.IsNoSpace(e))
                {
                    // A full file system: the original stays indexed, this run ends, writes pause (the next write or
                    // removal after the pause starts another run, which may free a segment).
                    lock (_lock)
                        throw NoSpaceLocked($"compaction's copy of block {key} was not written", e);
                }
                catch (IOException e)
                {
                    // As a failed block write: the device's next move is unknown, so writes stop (and so does compaction).
                    _fault ??= new TierException($"compaction's copy of block {key} to {_data.FileName}.{DataSegment(to)} at offset {DataOffset(to)} "
                        + $"failed: {_data.LastError ?? e.Message}", e);
                    throw;
                }
                copied = true;
                lock (_lock)
                {
                    // Removed meanwhile: its tombstone already cancels up to the copy (DropLocked saw _copying).
                    if (_index.TryGetValue(key, out var now) && now == entry)
                        _index[key] = entry with { Address = to };
                }
            }
            finally
            {
                lock (_lock)
                {
                    _dataInFlight.Remove(to);
                    if (!copied)
                        WriteFailedLocked(to);
                    _copying = null;
                }
            }
        }
        lock (_lock)
            _dataBegin = until; // every live block below `until` is now in its copy
        // Every segment file below, not only down to the first gap: one left over by a retirement that failed earlier
        // would otherwise outlive the tombstones truncated below, and its removed blocks would come back. Oldest first: a
        // tombstone sector lies above the records it cancels, so a retirement that stops part-way never leaves a cancelled
        // record behind without its sector (nor does a crash before the directory sync, where the file system's journal
        // keeps the renames in order, as ext4's and XFS's do).
        var retired = DataSegmentsOnDisk().Where(s => s < DataSegment(until)).ToList();
        await _data.RetireSegmentsAsync(retired).ConfigureAwait(false); // retired for good before the log forgets their tombstones
        bool truncated = false;
        lock (_lock)
        {
            SegmentsRetiredLocked(until);
            // Tombstones that cancel records only in deleted segments are no longer needed.
            while (_tombstones.TryPeek(out var t) && t.DataAddress < _dataBegin)
                _tombstones.Dequeue();
            // Not while the log is paused: it is reopened from its last good commit, and truncated at the next run.
            if (!_logPaused && _logOpen)
            {
                long keepFrom = _tombstones.TryPeek(out var first) ? first.LogAddress : _log.TailAddress;
                _log.TruncateUntilPageStart(keepFrom);
                _dirty = true;
                truncated = true;
            }
        }
        // The commit makes the truncation durable. While the log is paused there is none, and the run goes on: freeing data
        // segments is what gives a full disk room back (the tombstone sectors written meanwhile go with their segments).
        if (truncated)
            await JoinCommit().ConfigureAwait(false);
        Interlocked.Increment(ref _compactedSegments);
    }
}
