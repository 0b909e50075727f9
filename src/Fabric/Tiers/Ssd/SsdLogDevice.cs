using FASTER.core;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// The tombstone log's device, passing every call through, that remembers the first write that failed. FASTER moves
/// its flushed address past a failed write (the range is lost, it never writes it again), and a later commit would
/// record that address: recovery would then read the lost range, and may skip the tombstones behind it on its page.
/// The failure is noted before FASTER hears of it, so the commit manager refuses every commit record from then on
/// (<see cref="SsdCommitFile.Refuse"/>) and the store reopens the log from its last good commit instead.
/// </summary>
internal sealed class SsdLogDevice(IDevice inner) : StorageDeviceBase(inner.FileName, inner.SectorSize, inner.Capacity)
{
    private int _failedCode;

    /// <summary>The error code of the first write that failed (ENOSPC is 28), 0 while none has.</summary>
    public int FailedCode => Volatile.Read(ref _failedCode);

    /// <summary>The wrapped device's last error text, where it keeps one.</summary>
    public string? LastError => (inner as DirectFileDevice)?.LastError;

    public override void Initialize(long segmentSize, LightEpoch? epoch = null, bool omitSegmentIdFromFilename = false)
    {
        base.Initialize(segmentSize, epoch, omitSegmentIdFromFilename);
        inner.Initialize(segmentSize, epoch, omitSegmentIdFromFilename);
    }

    public override void WriteAsync(IntPtr sourceAddress, int segmentId, ulong destinationAddress, uint numBytesToWrite, DeviceIOCompletionCallback callback, object context) =>
        inner.WriteAsync(sourceAddress, segmentId, destinationAddress, numBytesToWrite, (errorCode, numBytes, ctx) =>
        {
            if (errorCode != 0)
                Interlocked.CompareExchange(ref _failedCode, (int)errorCode, 0);
            callback(errorCode, numBytes, ctx);
        }, context);

    public override void ReadAsync(int segmentId, ulong sourceAddress, IntPtr destinationAddress, uint readLength, DeviceIOCompletionCallback callback, object context) =>
        inner.ReadAsync(segmentId, sourceAddress, destinationAddress, readLength, callback, context);

    public override void RemoveSegmentAsync(int segment, AsyncCallback callback, IAsyncResult result) => inner.RemoveSegmentAsync(segment, callback, result);

    public override long GetFileSize(int segment) => inner.GetFileSize(segment);

    public override bool TryComplete() => inner.TryComplete();

    public override void Dispose() => inner.Dispose();
}
