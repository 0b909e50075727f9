namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // While the tombstone log's file system is full (the log paused), the committer writes every tombstone the log has
    // not committed as a sealed 4 KiB kind-2 sector at the data tail instead (SsdRecordHeader.WriteTombstoneSector): the
    // data tail segment is preallocated, so it takes them when the log cannot grow. One O_DIRECT | O_DSYNC write per batch;
    // the removals are durable when it completes, and the recovery scan applies the sectors as it applies the log. A
    // sector lies above every copy it cancels (the tail is past them when it is placed), and compaction retires segments
    // oldest first, in ascending order, so a sector leaves the disk only with or after the records it cancels. Once the
    // log is reopened, the tombstones are appended and committed there as before, and the sectors are dead space for
    // compaction. Where the data segments cannot take a sector (full, a device error, or past the span the store
    // reserved), its removal stays as without: not durable until the log takes it, counted in RemovalsNotDurable.
    private long _sectoredThrough;   // every tombstone with Seq below it has a durable sector or a commit (under _lock)
    private int _tombstoneSectorsWritten;
    // The tombstones still waiting for a sector while the log is paused, in order (under _lock): the uncommitted suffix of
    // _tombstones when the pause began, then every removal made during it. A batch takes them from the head, so it costs
    // what it writes, not a pass over every tombstone the store holds (one per removed record not yet compacted away).
    private readonly Queue<Tombstone> _awaitingSector = new();
    // Batches per committer round: a stream of removals cannot keep the committer from reopening the log when it is due.
    private const int SectorBatchesPerRound = 32;

    // Under _lock, when the log pauses: every tombstone neither committed nor written as a sector yet waits for one.
    private void QueueUncommittedForSectorsLocked()
    {
        _awaitingSector.Clear();
        foreach (var t in _tombstones)
        {
            if (t.LogAddress >= _durableLogAddress && t.Seq >= _sectoredThrough)
                _awaitingSector.Enqueue(t);
        }
    }

    /// <summary>Tombstones written as sectors in the data segments since opening, because the tombstone log's file system
    /// was full (each a 4 KiB sector; dead space once the log has committed its tombstone).</summary>
    public int TombstoneSectorsWritten => Volatile.Read(ref _tombstoneSectorsWritten);

    /// <summary>Tombstone sectors the recovery scan found and applied at open.</summary>
    public int RecoveredTombstoneSectors { get; private set; }

    // Sectors per write: as many as a pooled buffer of the data device holds (a record of MaxBlockBytes), at most 64.
    private int SectorsPerWrite => (int)Math.Min(64, (SsdRecordHeader.SectorSize + DataBytes(_options.MaxBlockBytes)) / SsdRecordHeader.SectorSize);

    // The committer, while the log is paused: writes sectors for the tombstones the log has not committed, in their order,
    // a batch at a time, until none is left or a write fails (tried again at the committer's next round), or after
    // SectorBatchesPerRound batches: the committer then comes back at once, after trying the reopen if it is due.
    private async Task WriteTombstoneSectorsAsync()
    {
        const int S = SsdRecordHeader.SectorSize;
        for (int round = 0; round < SectorBatchesPerRound; round++)
        {
            long at;
            int n = 0;
            long lastSeq = -1;
            bool behind = false;
            using var buffer = _data.RentBuffer(SectorsPerWrite * S);
            lock (_lock)
            {
                if (!_logPaused || _fault is not null || Environment.TickCount64 < Interlocked.Read(ref _noSpaceUntil))
                    return;
                // Never across a segment boundary; within the span the store reserved at open, as writes.
                long room = SegmentEnd(_dataTail) - _dataTail;
                long span = _spanLimit - (_dataTail - _dataBegin);
                int max = (int)Math.Min(SectorsPerWrite, Math.Min(room, Math.Max(0, span)) / S);
                at = _dataTail;
                foreach (var t in _awaitingSector)
                {
                    if (n == max)
                    {
                        behind = max == 0;
                        break;
                    }
                    SsdRecordHeader.WriteTombstoneSector(buffer.WritableSpan(n * S, S), t.Key, t.DataAddress, at + (long)n * S, _storeKey);
                    lastSeq = t.Seq;
                    n++;
                }
                if (n > 0)
                {
                    _dataTail += (long)n * S;
                    _dataInFlight.Add(at);
                }
            }
            if (behind)
                MaybeStartCompaction(); // the sectors wait for compaction to free a segment, as writes do
            if (n == 0)
                return;
            try
            {
                await _data.WriteAlignedAsync(DataSegment(at), DataOffset(at), buffer, n * S).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException or InvalidOperationException)
            {
                lock (_lock)
                {
                    _dataInFlight.Remove(at);
                    WriteFailedLocked(at);
                    // A full file system pauses writes (and these sectors) for NoSpaceRetry; a device error stops writes.
                    if (DirectFileDevice.IsNoSpace(e))
                        _ = NoSpaceLocked($"{n} tombstone sector(s) were not written", e);
                    else
                        _fault ??= new TierException($"writing {n} tombstone sector(s) to {_data.FileName}.{DataSegment(at)} at offset {DataOffset(at)} "
                            + $"failed: {_data.LastError ?? e.Message}", e);
                }
                return;
            }
            lock (_lock)
            {
                _dataInFlight.Remove(at);
                Interlocked.Add(ref _tombstoneSectorsWritten, n);
                _sectoredThrough = Math.Max(_sectoredThrough, lastSeq + 1);
                while (_awaitingSector.TryPeek(out var done) && done.Seq <= lastSeq)
                    _awaitingSector.Dequeue();
            }
        }
        Signal(); // more may wait: the next round comes at once
    }
}
