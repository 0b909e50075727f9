using FASTER.core;

namespace KvFabric.Tests.Tiers;

// A fault-injection double (after FASTER's SimulatedFlakyDevice): passes I/O to a real device until told to fail writes,
// then completes every write with ENOSPC, as a full file system would.
internal sealed class FaultyDevice : StorageDeviceBase
{
    private const uint ENOSPC = 28;
    private readonly IDevice _inner;
    private volatile bool _failWrites;

    public FaultyDevice(IDevice inner) : base(inner.FileName, inner.SectorSize, inner.Capacity) => _inner = inner;

    public int FailedWrites;

    public bool FailWrites { get => _failWrites; set => _failWrites = value; }

    /// <summary>Also fails writes while this says so (a file system full across the store's reopenings of its log).</summary>
    public Func<bool>? FailWhen { get; init; }

    /// <summary>The code a failed write completes with: ENOSPC unless set (5 is EIO, a device error).</summary>
    public uint ErrorCode { get; init; } = ENOSPC;

    public override void Initialize(long segmentSize, LightEpoch? epoch = null, bool omitSegmentIdFromFilename = false)
    {
        base.Initialize(segmentSize, epoch, omitSegmentIdFromFilename);
        _inner.Initialize(segmentSize, epoch, omitSegmentIdFromFilename);
    }

    public override void WriteAsync(IntPtr sourceAddress, int segmentId, ulong destinationAddress, uint numBytesToWrite, DeviceIOCompletionCallback callback, object context)
    {
        if (_failWrites || FailWhen?.Invoke() == true)
        {
            Interlocked.Increment(ref FailedWrites);
            callback(ErrorCode, 0, context);
            return;
        }
        _inner.WriteAsync(sourceAddress, segmentId, destinationAddress, numBytesToWrite, callback, context);
    }

    public override void ReadAsync(int segmentId, ulong sourceAddress, IntPtr destinationAddress, uint readLength, DeviceIOCompletionCallback callback, object context) =>
        _inner.ReadAsync(segmentId, sourceAddress, destinationAddress, readLength, callback, context);

    public override void RemoveSegmentAsync(int segment, AsyncCallback callback, IAsyncResult result) => _inner.RemoveSegmentAsync(segment, callback, result);

    public override long GetFileSize(int segment) => _inner.GetFileSize(segment);

    public override bool TryComplete() => _inner.TryComplete();

    /// <summary>Runs when the store disposes the device (after it has closed the log), before the real device goes.</summary>
    public Action? OnDispose { get; set; }

    public override void Dispose()
    {
        OnDispose?.Invoke();
        _inner.Dispose();
    }
}
