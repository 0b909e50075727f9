using System.Buffers;
using KvFabric.Compression;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // A write: the payload is copied (and hashed) into an aligned buffer and written O_DIRECT | O_DSYNC to its own place in
    // a data segment, in parallel with every other writer's, as fio writes; only once it is on stable storage is its
    // reference appended to the log. Group commit: writers append, join the open batch and signal; one committer commits
    // the log up to its tail (covering every reference appended before the batch closed) and completes the batch at once.
    private readonly SemaphoreSlim _commitSignal = new(0);
    private readonly Task _committer;
    private TaskCompletionSource _batch = NewBatch();
    private int _signalled;
    private long _commitCount;
    private int _appending;     // writers between appending their reference and joining a batch (under _lock)
    private long _batchBytes;   // record bytes in the open batch (under _lock)
    private bool _dirty;
    private volatile bool _stopping;          // no new compaction
    private volatile bool _stopCommitter;     // set once compaction is idle: the last commit, then the committer ends
    private volatile Exception? _fault;

    /// <summary>Group commits completed since opening (blocks written / commits = the batching achieved).</summary>
    public long Commits => Interlocked.Read(ref _commitCount);

    private static TaskCompletionSource NewBatch() => new(TaskCreationOptions.RunContinuationsAsynchronously);

    /// <summary>
    /// Appends the block and returns true once it is committed (it survives a crash from then on); false when it does not fit.
    /// A key already stored is not written again (a block hash names its content). Cancellation is honoured until the record
    /// is appended; after that the write completes, because the record will be in the log either way.
    /// </summary>
    public async ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        ValidateBlock(meta, block.Length);
        cancellationToken.ThrowIfCancellationRequested();
        if (_fault is { } fault)
            ThrowFaulted(fault);

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
                lock (_lock)
                {
                    if (_index.ContainsKey(key))
                        return true;
                    if (!_pending.TryGetValue(key, out sameKey))
                    {
                        if (_used + _reserved + payload.Length > _options.CapacityBytes)
                            return false;
                        _reserved += payload.Length;
                        done = new TaskCompletionSource<bool>(TaskCreationOptions.RunContinuationsAsynchronously);
                        _pending.Add(key, done);
                        dataAddress = ReserveDataLocked(payload.Length);
                    }
                }
                if (sameKey is null)
                    return await WriteAndCommitAsync(key, meta, payload, codec, dataAddress, done!, cancellationToken).ConfigureAwait(false);
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

    // Under _lock: room for a payload in the data segments, 4 KiB aligned, never across a segment boundary.
    private long ReserveDataLocked(int storedLength)
    {
        long length = DataBytes(storedLength);
        if (_dataTail % _options.SegmentBytes + length > _options.SegmentBytes)
            _dataTail = SegmentEnd(_dataTail);
        long address = _dataTail;
        _dataTail += length;
        _dataInFlight.Add(address);
        return address;
    }

    // Copies the payload into an aligned buffer (zero-padded to 4 KiB), computes the header's checksum over that copy while
    // it is still in cache, and writes it to its data address; durable when this returns (O_DSYNC). Returns the block's
    // log reference (header with that checksum, data address, reference checksum).
    private async Task<SsdRefBytes> WriteDataAsync(SsdRecordHeader header, ReadOnlyMemory<byte> payload, long dataAddress)
    {
        int length = DataBytes(payload.Length);
        var refBytes = new SsdRefBytes();
        using (var buffer = _data.RentBuffer(length))
        {
            var span = buffer.WritableSpan(0, length);
            payload.Span.CopyTo(span);
            span[payload.Length..].Clear();
            header.Write(refBytes, span[..payload.Length]);
            await _data.WriteAlignedAsync(DataSegment(dataAddress), DataOffset(dataAddress), buffer, length).ConfigureAwait(false);
        }
        SsdRecordHeader.WriteRef(refBytes, ((ReadOnlySpan<byte>)refBytes)[..SsdRecordHeader.Size], dataAddress);
        return refBytes;
    }

    private int DataSegment(long dataAddress) => (int)(dataAddress / _options.SegmentBytes);

    private long DataOffset(long dataAddress) => dataAddress % _options.SegmentBytes;

    private async ValueTask<bool> WriteAndCommitAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> payload, SsdCodec codec, long dataAddress,
        TaskCompletionSource<bool> done, CancellationToken cancellationToken)
    {
        bool appending = false, appended = false, joined = false;
        try
        {
            var header = new SsdRecordHeader(SsdRecordKind.Block, codec, key, meta, payload.Length);
            SsdRefBytes refBytes;
            try
            {
                refBytes = await WriteDataAsync(header, payload, dataAddress).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or ObjectDisposedException)
            {
                // A data write that failed (disk full, device error) stops writes as a failed commit does.
                _fault ??= new TierException($"writing a block's payload to {_data.FileName}.{DataSegment(dataAddress)} failed: {_data.LastError ?? e.Message}", e);
                throw;
            }
            cancellationToken.ThrowIfCancellationRequested();
            ulong checksum = System.Buffers.Binary.BinaryPrimitives.ReadUInt64LittleEndian(((ReadOnlySpan<byte>)refBytes)[56..]);
            var entry = new SsdLogEntry(refBytes);
            lock (_lock)
            {
                _appending++;
                _refFloors[key] = _log.TailAddress;
            }
            appending = true;
            if (!_log.TryEnqueue(entry, out long address))
                address = await _log.EnqueueAsync(entry, cancellationToken).ConfigureAwait(false);
            appended = true;
            var commit = JoinCommit(SsdRecordHeader.RefSize);
            joined = true;
            await commit.ConfigureAwait(false);
            lock (_lock)
            {
                _pending.Remove(key);
                _refFloors.Remove(key);
                _reserved -= payload.Length;
                _dataInFlight.Remove(dataAddress);
                var added = new Entry(dataAddress, payload.Length, codec, meta, checksum, address);
                _index.Add(key, added);
                _used += payload.Length;
                _liveDataBytes += added.DataLength;
            }
            done.TrySetResult(true);
            MaybeStartCompaction();
            return true;
        }
        catch (Exception e)
        {
            bool last;
            lock (_lock)
            {
                _pending.Remove(key);
                _refFloors.Remove(key);
                _reserved -= payload.Length;
                _dataInFlight.Remove(dataAddress);
                last = appending && !joined && --_appending == 0;
            }
            // A writer that gave up before appending also signals while the store closes: the committer's last round
            // waits for every pending writer, and would wait for a signal forever.
            if (last || (!appending && _stopCommitter))
                Signal();
            if (e is OperationCanceledException && !appended)
            {
                done.TrySetCanceled(cancellationToken);
                throw;
            }
            var failure = e as TierException ?? new TierException($"Writing block {key} to the SSD tier in {Directory} failed ({DeviceError(e)}); "
                + "the block is not stored. Free space on that file system or check the device, then retry or reopen the store.", e);
            done.TrySetException(failure);
            _ = done.Task.Exception; // observed here; a same-key waiter rethrows it
            throw failure;
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
                + "SsdBlockStoreOptions.MaxBlockBytes (and LogPageBytes with it).", nameof(length));
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

    // A writer that appended joins the open batch. The commit starts when no other append is under way (they would join
    // in microseconds and otherwise wait a whole commit), or when the batch already holds a log page of data. Starting
    // on the first joiner made commits alternate between one block and the rest (traced: 2 MiB, 12 MiB, 2 MiB, ...).
    private Task JoinCommit(int recordBytes)
    {
        Task batch;
        bool start;
        lock (_lock)
        {
            batch = _batch.Task;
            _batchBytes += recordBytes;
            start = --_appending == 0 || _batchBytes >= _options.LogPageBytes;
        }
        if (start)
            Signal();
        return batch;
    }

    private void Signal()
    {
        if (Interlocked.Exchange(ref _signalled, 1) == 0)
            _commitSignal.Release();
    }

    // Commits in flight at once. Traced: writers join the next batch while a commit's data is still on its way to the disk;
    // a second commit sends theirs at once, so the disk sees a deeper queue (A/B/A/B here: 0.50-0.58 GB/s against
    // 0.44-0.49 with one; four was worse). Each batch is completed only once the committed address covers its tail.
    private const int CommitsInFlight = 2;
    private readonly SemaphoreSlim _commitSlots = new(CommitsInFlight);

    private async Task CommitLoopAsync()
    {
        while (true)
        {
            await _commitSignal.WaitAsync().ConfigureAwait(false);
            Volatile.Write(ref _signalled, 0);
            await _commitSlots.WaitAsync().ConfigureAwait(false);
            TaskCompletionSource batch;
            long tail;
            lock (_lock)
            {
                batch = _batch;
                _batch = NewBatch();
                _batchBytes = 0;
                _dirty = false;
                // Every record of this batch was appended before its writer joined the batch, so it lies below this tail.
                tail = _log.TailAddress;
            }
            var commit = CommitAsync(batch, tail);
            if (_stopCommitter)
            {
                await commit.ConfigureAwait(false);
                bool more;
                lock (_lock)
                    more = _dirty || _pending.Count > 0;
                if (!more)
                {
                    for (int i = 0; i < CommitsInFlight; i++)
                        await _commitSlots.WaitAsync().ConfigureAwait(false);
                    return;
                }
            }
        }
    }

    private async Task CommitAsync(TaskCompletionSource batch, long tail)
    {
        try
        {
            if (_fault is { } fault)
            {
                batch.TrySetException(fault);
                return;
            }
            await _log.CommitAsync().ConfigureAwait(false);
            // The batch's coverage is checked, not assumed: FASTER may complete a commit call on an earlier commit.
            if (_log.CommittedUntilAddress < tail)
                await _log.WaitForCommitAsync(tail).ConfigureAwait(false);
            Interlocked.Increment(ref _commitCount);
            batch.TrySetResult();
        }
        catch (Exception e)
        {
            _fault ??= e;
            batch.TrySetException(e);
        }
        finally
        {
            _ = batch.Task.Exception;
            _commitSlots.Release();
        }
    }
}
