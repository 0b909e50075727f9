using System.Buffers;
using KvFabric.Compression;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // A write is one record, a sealed header sector then the payload, written O_DIRECT | O_DSYNC to its own place in a
    // data segment, in parallel with every other writer's, as fio writes: durable, and acknowledged, when that write
    // completes. The log holds tombstones only; group commit makes removals durable: Remove appends and signals, one
    // committer commits the log up to its tail and completes the batch at once.
    private readonly SemaphoreSlim _commitSignal = new(0);
    private Task _committer = Task.CompletedTask; // started once recovery is done
    private TaskCompletionSource _batch = NewBatch();
    private int _signalled;
    private int _writers;       // writers between reserving their data address and finishing (under _lock)
    private bool _dirty;
    private volatile bool _stopping;          // no new compaction
    private volatile bool _stopCommitter;     // set once compaction is idle: the last commit, then the committer ends
    private volatile Exception? _fault;       // writes refused: a device error on the data segments or the log
    private volatile Exception? _logFault;    // the tombstone log failed (a device error, not a full disk): no more tombstones or commits
    private long _noSpaceUntil;               // Environment.TickCount64 until which writes are refused: the file system was full
    private volatile string? _noSpace;        // the last ENOSPC write's error
    private int _noSpaceWrites;
    private int _writesRefusedCompactionBehind;

    /// <summary>Writes refused (false) because compaction had fallen behind: the data segments would have outgrown the disk
    /// the store reserved at open (<see cref="SsdBlockStoreOptions.CompactionSlack"/> and one segment past the live records).</summary>
    public int WritesRefusedCompactionBehind => Volatile.Read(ref _writesRefusedCompactionBehind);

    /// <summary>True once a device error stopped writes (until the store is reopened); a full file system only pauses them.</summary>
    public bool WritesStopped => _fault is not null;

    /// <summary>Writes (block records and compaction copies) that found the file system full since opening.</summary>
    public int NoSpaceWrites => Volatile.Read(ref _noSpaceWrites);

    // A full file system: writes are refused for NoSpaceRetry, then tried again (space may have been freed meanwhile).
    private TierException NoSpaceLocked(string what, Exception e)
    {
        _noSpace = _data.LastError ?? e.Message;
        _noSpaceUntil = Environment.TickCount64 + (long)_options.NoSpaceRetry.TotalMilliseconds;
        Interlocked.Increment(ref _noSpaceWrites);
        return NoSpaceFailure(what, e);
    }

    private TierException NoSpaceFailure(string what, Exception? e)
    {
        string message = $"{what}: the file system of the SSD tier in {Directory} is full ({_noSpace}). Blocks already stored stay readable; "
            + $"writes are refused for {_options.NoSpaceRetry.TotalSeconds:0.#} s at a time and resume once a write fits again: free space on that file system.";
        return e is null ? new TierException(message) : new TierException(message, e);
    }

    private static TaskCompletionSource NewBatch() => new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>
    /// Writes the block and returns true once it is on stable storage (it survives a crash from then on); false when it does
    /// not fit. A key already stored is not written again (a block hash names its content). Cancellation is honoured until
    /// the record's write is issued; after that the write completes.
    /// </summary>
    public async ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        ValidateBlock(meta, block.Length);
        cancellationToken.ThrowIfCancellationRequested();
        if (_fault is { } fault)
            ThrowFaulted(fault);
        if (Environment.TickCount64 < Interlocked.Read(ref _noSpaceUntil))
            throw NoSpaceFailure($"block {key} was not written", null);

        byte[]? compressed = null;
        try
        {
            var codec = SsdCodec.None;
            ReadOnlyMemory<byte> payload = block;
            if (_options.Compression && TryCompress(block.Span, out compressed, out int compressedLength))
            {
                codec = SsdCodec.Zstd;
                payload = compressed.AsMemory(0, compressedLength);
            }

            while (true)
            {
                TaskCompletionSource<bool>? sameKey, done = null;
                long dataAddress = -1;
                bool behind = false;
                lock (_lock)
                {
                    if (_index.ContainsKey(key))
                        return true;
                    if (!_pending.TryGetValue(key, out sameKey))
                    {
                        // Stored bytes against the capacity, and disk bytes (header sector, padding) against the disk
                        // the store reserved at open: a tiny compressed block still takes 8 KiB of disk.
                        long disk = SsdRecordHeader.SectorSize + DataBytes(payload.Length);
                        if (_used + _reserved + payload.Length > _options.CapacityBytes || _liveDataBytes + _reservedDisk + disk > _diskBudget)
                            return false;
                        // Compaction is behind (dead records past the slack and a segment more): the store would outgrow
                        // the disk it reserved at open. Refused like a full tier, until compaction frees a segment.
                        behind = _dataTail - _dataBegin + disk > _spanLimit;
                    }
                    if (sameKey is null && !behind)
                    {
                        long disk = SsdRecordHeader.SectorSize + DataBytes(payload.Length);
                        _reserved += payload.Length;
                        _reservedDisk += disk;
                        done = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
                        _pending.Add(key, done);
                        dataAddress = ReserveDataLocked(payload.Length);
                        _writers++;
                    }
                }
                if (behind)
                {
                    Interlocked.Increment(ref _writesRefusedCompactionBehind);
                    MaybeStartCompaction();
                    return false;
                }
                if (sameKey is null)
                    return await WriteRecordAsync(key, meta, payload, codec, dataAddress, done!, cancellationToken).ConfigureAwait(false);
                try
                {
                    return await sameKey.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
                }
                catch (OperationCanceledException) when (sameKey.Task.IsCanceled && !cancellationToken.IsCancellationRequested)
                {
                    // The first writer of this key was cancelled (its caller's token, not ours): write it ourselves.
                }
            }
        }
        finally
        {
            if (compressed is not null)
                ArrayPool<byte>.Shared.Return(compressed);
        }
    }

    // Under _lock: room for a record (header sector + payload) in the data segments, 4 KiB aligned, never across a
    // segment boundary.
    private long ReserveDataLocked(int storedLength)
    {
        long length = SsdRecordHeader.SectorSize + DataBytes(storedLength);
        if (_dataTail % _options.SegmentBytes + length > _options.SegmentBytes)
            _dataTail = SegmentEnd(_dataTail);
        long address = _dataTail;
        _dataTail += length;
        _dataInFlight.Add(address);
        return address;
    }

    private int DataSegment(long dataAddress) => (int)(dataAddress / _options.SegmentBytes);

    private long DataOffset(long dataAddress) => dataAddress % _options.SegmentBytes;

    // Copies the payload behind the header sector of an aligned buffer (zero-padded to 4 KiB), computes the checksum over
    // that copy while it is in cache, seals the header sector for the data address and writes the whole record with one
    // O_DIRECT | O_DSYNC write. Durable, and indexed, when it returns.
    private async ValueTask<bool> WriteRecordAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> payload, SsdCodec codec, long dataAddress,
        TaskCompletionSource<bool> done, CancellationToken cancellationToken)
    {
        var entry = new Entry(dataAddress, payload.Length, codec, meta, 0);
        bool issued = false;
        try
        {
            using (var buffer = _data.RentBuffer(entry.DataLength))
            {
                var record = buffer.WritableSpan(0, entry.DataLength);
                var body = record[SsdRecordHeader.SectorSize..];
                payload.Span.CopyTo(body);
                body[payload.Length..].Clear();
                entry.Header(key).Write(record, body[..payload.Length]);
                entry = entry with { Checksum = System.Buffers.Binary.BinaryPrimitives.ReadUInt64LittleEndian(record[56..]) };
                SsdRecordHeader.SealSector(record[..SsdRecordHeader.SectorSize], dataAddress, _storeKey);
                cancellationToken.ThrowIfCancellationRequested();
                issued = true;
                try
                {
                    await _data.WriteAlignedAsync(DataSegment(dataAddress), DataOffset(dataAddress), buffer, entry.DataLength).ConfigureAwait(false);
                }
                catch (Exception e) when (DirectFileDevice.IsNoSpace(e))
                {
                    // A full file system: nothing is wrong with the device, and space can come back. Writes pause and are
                    // tried again; a partly written record fails its checksum at recovery and is never served (the
                    // settled mark stays below it, WriteFailedLocked).
                    lock (_lock)
                        throw NoSpaceLocked($"block {key} was not written", e);
                }
                catch (Exception e) when (e is IOException or ObjectDisposedException or InvalidOperationException)
                {
                    // A failed record write (device error) stops writes: what the device does next is unknown.
                    // A partly written record fails its checksum at recovery and is never served.
                    _fault ??= new TierException($"writing a block's record to {_data.FileName}.{DataSegment(dataAddress)} at offset "
                        + $"{DataOffset(dataAddress)} failed: {_data.LastError ?? e.Message}", e);
                    throw;
                }
            }
            lock (_lock)
            {
                _pending.Remove(key);
                _reserved -= payload.Length;
                _reservedDisk -= entry.DataLength;
                _dataInFlight.Remove(dataAddress);
                _writers--;
                _index.Add(key, entry);
                _used += payload.Length;
                _liveDataBytes += entry.DataLength;
            }
            done.TrySetResult(true);
            MaybeStartCompaction();
            return true;
        }
        catch (Exception e)
        {
            lock (_lock)
            {
                _pending.Remove(key);
                _reserved -= payload.Length;
                _reservedDisk -= entry.DataLength;
                _dataInFlight.Remove(dataAddress);
                if (issued)
                    WriteFailedLocked(dataAddress);
                _writers--;
            }
            if (e is OperationCanceledException && !issued)
            {
                done.TrySetCanceled(cancellationToken);
                throw;
            }
            var failure = e as TierException ?? new TierException($"Writing block {key} to the SSD tier in {Directory} failed ({DeviceError(e)}); "
                + (_fault is not null
                    ? "the block is not stored, and the tier takes no more writes until it is reopened: check the device, then reopen the store (restart the sidecar); blocks stored before stay readable."
                    : "the block is not stored; retry it."), e);
            done.TrySetException(failure);
            _ = done.Task.Exception; // observed here; a same-key waiter rethrows it
            throw failure;
        }
    }

    /// <summary>Shutdown: waits (up to 30 s, then goes on) until no write is between reserving its place and finishing.</summary>
    private async Task WaitForWritersAsync()
    {
        long started = System.Diagnostics.Stopwatch.GetTimestamp(); // monotonic: a clock step must not cut the wait short
        while (System.Diagnostics.Stopwatch.GetElapsedTime(started) < TimeSpan.FromSeconds(30))
        {
            lock (_lock)
            {
                if (_writers == 0)
                    return;
            }
            await Task.Delay(1).ConfigureAwait(false);
        }
    }

    private void ValidateBlock(BlockMeta meta, int length)
    {
        if (length == 0)
            throw new ArgumentException("An empty block cannot be stored in the SSD tier: pass the block's bytes.", nameof(length));
        if (_options.BlockBytes > 0 && length != _options.BlockBytes)
            throw new ArgumentException($"Block of {length} bytes given to an SSD tier configured for exactly {_options.BlockBytes}-byte blocks "
                + "(SsdBlockStoreOptions.BlockBytes); pass whole blocks of the layout, or set BlockBytes = 0 to accept any length.", nameof(length));
        if (length > _options.MaxBlockBytes)
            throw new ArgumentException($"Block of {length} bytes exceeds the SSD tier's MaxBlockBytes ({_options.MaxBlockBytes}); raise "
                + "SsdBlockStoreOptions.MaxBlockBytes (and SegmentBytes with it if needed).", nameof(length));
        if (meta.Length != length)
            throw new ArgumentException($"BlockMeta.Length ({meta.Length}) differs from the block's length ({length}); they must match.", nameof(meta));
        if (meta.Depth < 0)
            throw new ArgumentException($"BlockMeta.Depth ({meta.Depth}) is negative; a chain's first block has depth 0.", nameof(meta));
    }

    // Cheap bail-out first: zstd on two 8 KiB samples (start and middle). KV blocks of noisy floats save nothing there and skip
    // the full pass; zeros, padding and quantized blocks compress on the samples and then as a whole.
    private bool TryCompress(ReadOnlySpan<byte> block, out byte[]? compressed, out int length)
    {
        compressed = null;
        length = 0;
        int keepAtMost = (int)(block.Length * (1 - _options.MinCompressionSaving));
        const int Sample = 8 << 10;
        if (block.Length >= 8 * Sample)
        {
            Span<byte> scratch = stackalloc byte[Sample];
            int limit = (int)(Sample * (1 - _options.MinCompressionSaving));
            bool first = Zstd.TryCompress(block[..Sample], scratch[..limit], _options.CompressionLevel, out _);
            bool middle = Zstd.TryCompress(block.Slice(block.Length / 2, Sample), scratch[..limit], _options.CompressionLevel, out _);
            if (!first && !middle)
                return false;
        }
        if (keepAtMost <= 0)
            return false;
        byte[] buffer = ArrayPool<byte>.Shared.Rent(keepAtMost);
        if (!Zstd.TryCompress(block, buffer.AsSpan(0, keepAtMost), _options.CompressionLevel, out length))
        {
            ArrayPool<byte>.Shared.Return(buffer);
            return false;
        }
        compressed = buffer;
        return true;
    }

    private Task JoinCommit()
    {
        Task batch;
        lock (_lock)
            batch = _batch.Task;
        Signal();
        return batch;
    }

    private void Signal()
    {
        if (Interlocked.Exchange(ref _signalled, 1) == 0)
            _commitSignal.Release();
    }

    // Commits in flight at once: removals that arrive while a commit is on its way to the disk get their own at once.
    // Each batch is completed only once the committed address covers its tail.
    private const int CommitsInFlight = 2;
    private readonly SemaphoreSlim _commitSlots = new(CommitsInFlight);

    private async Task CommitLoopAsync()
    {
        int reopensAtStop = 0;
        while (true)
        {
            // While the log is paused (its file system was full) the committer wakes when the pause ends; at shutdown at once.
            var wait = _stopCommitter ? TimeSpan.Zero
                : _logPaused ? TimeSpan.FromMilliseconds(Math.Max(0, Interlocked.Read(ref _logRetryAt) - Environment.TickCount64))
                : Timeout.InfiniteTimeSpan;
            if (await _commitSignal.WaitAsync(wait).ConfigureAwait(false))
                Volatile.Write(ref _signalled, 0);
            if (_logPaused)
            {
                // The removals the log has not committed are made durable as tombstone sectors in the data segments first.
                await WriteTombstoneSectorsAsync().ConfigureAwait(false);
                // Shutdown tries once more at once (space may be back), and gives up after a second failure: the removals
                // durable neither in the log nor as sectors are then lost, as at a crash (docs/tiers-ssd.md).
                bool reopened = (_stopCommitter || Environment.TickCount64 >= Interlocked.Read(ref _logRetryAt)) && await ReopenLogAsync().ConfigureAwait(false);
                if (!reopened)
                {
                    FailBatchWhilePaused();
                    if (_stopCommitter && (++reopensAtStop >= 2 || _logFault is not null))
                    {
                        await DrainCommitsAsync().ConfigureAwait(false);
                        return;
                    }
                    continue;
                }
            }
            await _commitSlots.WaitAsync().ConfigureAwait(false);
            TaskCompletionSource batch;
            long tail;
            lock (_lock)
            {
                batch = _batch;
                _batch = NewBatch();
                _dirty = false;
                // Every tombstone of this batch was appended before it joined the batch, so it lies below this tail.
                tail = _logOpen ? _log.TailAddress : 0;
            }
            var commit = CommitAsync(batch, tail);
            if (_stopCommitter)
            {
                await commit.ConfigureAwait(false);
                bool more;
                lock (_lock)
                    more = _dirty || (_logPaused && _logFault is null && reopensAtStop < 2);
                if (!more)
                {
                    await DrainCommitsAsync().ConfigureAwait(false);
                    return;
                }
                if (_logPaused)
                    reopensAtStop++;
            }
        }
    }

    private async Task DrainCommitsAsync()
    {
        for (int i = 0; i < CommitsInFlight; i++)
            await _commitSlots.WaitAsync().ConfigureAwait(false);
    }

    private async Task CommitAsync(TaskCompletionSource batch, long tail)
    {
        try
        {
            // A data-segment error stops writes, not the tombstone log: removals stay durable.
            if (_logFault is { } fault)
            {
                batch.TrySetException(fault);
                return;
            }
            if (_logPaused)
            {
                batch.TrySetException(LogNoSpaceFailure(null));
                return;
            }
            await _log.CommitAsync().ConfigureAwait(false);
            // The batch's coverage is checked, not assumed: FASTER may complete a commit call on an earlier commit.
            if (_log.CommittedUntilAddress < tail)
                await _log.WaitForCommitAsync(tail).ConfigureAwait(false);
            // A write that failed below the tail (a page flushed on its own, or a commit beside this one) lost its range,
            // and FASTER moved past it: nothing was committed (SsdCommitFile refused the record).
            if (_device.FailedCode != 0)
                throw new IOException($"a write of the tombstone log failed ({_device.LastError ?? "error " + _device.FailedCode})", _device.FailedCode);
            lock (_lock)
            {
                _durableLogAddress = Math.Max(_durableLogAddress, tail);
                if (!_logPaused)
                    _removalsPaused = false;
            }
            batch.TrySetResult();
        }
        catch (Exception e)
        {
            if (IsLogNoSpace(e))
            {
                // A full file system: the removals stay done in this process, not durable; the log pauses and is reopened
                // from its last good commit after NoSpaceRetry, and every tombstone past that commit is appended again.
                batch.TrySetException(PauseLog(e));
            }
            else
            {
                _logFault ??= e;
                _fault ??= e;
                batch.TrySetException(e);
            }
        }
        finally
        {
            _ = batch.Task.Exception;
            _commitSlots.Release();
        }
    }
}
