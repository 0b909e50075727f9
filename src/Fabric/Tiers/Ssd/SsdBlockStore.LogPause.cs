using FASTER.core;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // A full file system under the tombstone log pauses it, as it pauses data writes: FASTER has moved past the range it
    // could not write (SsdLogDevice), so the log is closed and opened again from its last good commit, and every
    // tombstone past that commit is appended again. Meanwhile removals go on in this process; their tombstones wait in
    // _tombstones (NotAppended).
    private volatile bool _logPaused;
    private volatile bool _removalsPaused;  // from a full-disk failure until a commit succeeds again (through reopenings)
    private long _logRetryAt;             // Environment.TickCount64 when the paused log is reopened and committed again
    private bool _logOpen = true;         // false between closing a paused log and opening it again (under _lock)
    private long _durableLogAddress;      // below it, every tombstone is committed (under _lock)
    private int _noSpaceLogCommits;
    private int _removalsAfterLogFault;   // removals made after a log device error: never durable in this process (under _lock)
    private volatile string? _logNoSpace; // the last full-disk error of the log

    /// <summary>Commits of the tombstone log that found its file system full since opening (each pauses removals'
    /// durability for <see cref="SsdBlockStoreOptions.NoSpaceRetry"/>).</summary>
    public int NoSpaceLogCommits => Volatile.Read(ref _noSpaceLogCommits);

    /// <summary>True from a commit of the tombstone log that found its file system full until a commit succeeds again:
    /// removals are done in this process meanwhile, durable only as tombstone sectors in the data segments
    /// (<see cref="RemovalsNotDurable"/> counts those not written yet).</summary>
    public bool RemovalsPaused => _removalsPaused;

    /// <summary>Removals whose tombstone is neither committed to the log nor written as a tombstone sector in a data
    /// segment (a crash now would bring their blocks back), those made after a device error on the log included.</summary>
    public int RemovalsNotDurable
    {
        get
        {
            lock (_lock)
            {
                int n = _removalsAfterLogFault;
                foreach (var t in _tombstones)
                {
                    if (t.LogAddress >= _durableLogAddress && t.Seq >= _sectoredThrough)
                        n++;
                }
                return n;
            }
        }
    }

    // A commit's failure: the log device's failed write says what it was, else the exception does.
    private bool IsLogNoSpace(Exception e)
    {
        int code = _device.FailedCode;
        return code != 0 ? code is DirectFileDevice.NoSpace or DirectFileDevice.QuotaExceeded : HasNoSpace(e);
    }

    private static bool HasNoSpace(Exception e)
    {
        for (Exception? x = e; x is not null; x = x.InnerException)
        {
            if (DirectFileDevice.IsNoSpace(x))
                return true;
        }
        return false;
    }

    private TierException PauseLog(Exception e)
    {
        lock (_lock)
        {
            if (!_logPaused)
                QueueUncommittedForSectorsLocked();
            _logPaused = true;
            _removalsPaused = true;
            _logRetryAt = Environment.TickCount64 + (long)_options.NoSpaceRetry.TotalMilliseconds;
        }
        _logNoSpace = _device.LastError ?? e.Message;
        Interlocked.Increment(ref _noSpaceLogCommits);
        Signal(); // the committer may be waiting for removals with no deadline: it waits for the pause to end instead
        return LogNoSpaceFailure(e);
    }

    private TierException LogNoSpaceFailure(Exception? e)
    {
        string message = $"The tombstone log of the SSD tier in {Directory} found its file system full ({_logNoSpace}). Removed blocks are gone "
            + "from this process; their removals are made durable as tombstone sectors in the data segments where those fit (until then a "
            + $"crash would bring them back), and the log is reopened and the removals committed again every {_options.NoSpaceRetry.TotalSeconds:0.#} s "
            + "until they fit: free space on that file system.";
        return e is null ? new TierException(message) : new TierException(message, e);
    }

    // Joiners of the batch (compaction) learn at once that nothing of theirs became durable.
    private void FailBatchWhilePaused()
    {
        TaskCompletionSource batch;
        lock (_lock)
        {
            batch = _batch;
            _batch = NewBatch();
        }
        batch.TrySetException(_logFault ?? LogNoSpaceFailure(null));
        _ = batch.Task.Exception;
    }

    // With no commit in flight: closes the log, opens it again (FASTER recovers its newest good commit, whose record no
    // commit past a failed write replaced), and appends again every tombstone at or past that commit's address, in their
    // order. True once the tombstones are appended (the caller commits them); false if the log could not be opened.
    private async Task<bool> ReopenLogAsync()
    {
        await DrainCommitsAsync().ConfigureAwait(false);
        try
        {
            FasterLog? old = null;
            SsdLogDevice? oldDevice = null;
            lock (_lock)
            {
                if (_logOpen)
                {
                    (old, oldDevice, _logOpen) = (_log, _device, false);
                }
            }
            old?.Dispose();
            oldDevice?.Dispose();
            var device = CreateLogDevice(_options);
            FasterLog log;
            try
            {
                log = await FasterLog.CreateAsync(LogSettings(_options, device, _commits)).ConfigureAwait(false);
            }
            catch
            {
                device.Dispose();
                throw;
            }
            lock (_lock)
            {
                long durable = log.TailAddress;
                var kept = new Queue<Tombstone>(_tombstones.Count);
                foreach (var t in _tombstones)
                    kept.Enqueue(t.LogAddress < durable ? t : t with { LogAddress = log.Enqueue(TombstoneEntry(t.Key, t.DataAddress)) });
                (_tombstones, _device, _log, _logOpen, _durableLogAddress) = (kept, device, log, true, durable);
                _logPaused = false;
                _awaitingSector.Clear(); // in the log again; a commit that fails now queues them again (PauseLog)
                _dirty = true;
            }
            return true;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            if (HasNoSpace(e))
                _ = PauseLog(e);
            else
            {
                _logFault ??= e;
                _fault ??= e;
            }
            return false;
        }
        finally
        {
            _commitSlots.Release(CommitsInFlight);
        }
    }
}
