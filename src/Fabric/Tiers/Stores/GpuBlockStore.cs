using KvFabric.Memory.Device;

namespace KvFabric.Tiers.Stores;

// The GPU tier: fixed-size block slots in one device allocation. Copies go through one stream and complete before the
// call returns (the stream is synchronized), so the caller's buffer is free again on return. Copies are serialized: the
// tier manager moves one block at a time anyway, and a synchronize waits for the whole stream.
public sealed class GpuBlockStore : SlottedBlockStore
{
    private readonly IDeviceMemory _device;
    private readonly DeviceBuffer _arena;
    private readonly DeviceStream _stream;
    private readonly Lock _copyLock = new();
    private readonly int[] _free;
    private int _freeCount;

    public GpuBlockStore(IDeviceMemory device, int blockBytes, int slotCount)
        : base(TierKind.Gpu, blockBytes, slotCount)
    {
        ArgumentNullException.ThrowIfNull(device);
        _device = device;
        _arena = device.Allocate((long)blockBytes * slotCount);
        _stream = device.CreateStream();
        _free = new int[slotCount];
        for (int i = 0; i < slotCount; i++)
            _free[i] = slotCount - 1 - i;
        _freeCount = slotCount;
    }

    public IDeviceMemory Device => _device;

    // The device address of a resident block (for a device-to-device transfer backend).
    public bool TryGetDeviceAddress(BlockKey key, out nint address)
    {
        address = TryGetSlot(key, out int slot) ? _arena.Pointer + (nint)((long)slot * BlockBytes) : 0;
        return address != 0;
    }

    protected override bool TryAcquireSlot(out int slot)
    {
        slot = _freeCount > 0 ? _free[--_freeCount] : -1;
        return slot >= 0;
    }

    protected override void ReleaseSlot(int slot) => _free[_freeCount++] = slot;

    protected override unsafe void CopyIn(int slot, ReadOnlySpan<byte> source)
    {
        fixed (byte* p = source)
        {
            lock (_copyLock)
            {
                try
                {
                    _device.CopyToDeviceAsync(_arena, (long)slot * BlockBytes, p, source.Length, _stream);
                    _device.SynchronizeStream(_stream);
                }
                catch (DeviceMemoryException e)
                {
                    throw DeviceError("write", slot, e);
                }
            }
        }
    }

    protected override unsafe void CopyOut(int slot, Span<byte> destination)
    {
        fixed (byte* p = destination)
        {
            lock (_copyLock)
            {
                try
                {
                    _device.CopyToHostAsync(p, _arena, (long)slot * BlockBytes, destination.Length, _stream);
                    _device.SynchronizeStream(_stream);
                }
                catch (DeviceMemoryException e)
                {
                    throw DeviceError("read", slot, e);
                }
            }
        }
    }

    // IBlockStore reports I/O failures as TierException, which the tier manager turns into a lost placement (or a read
    // that stops) and a StoreErrors count instead of failing the caller's whole put or get.
    private TierException DeviceError(string what, int slot, DeviceMemoryException e) =>
        new($"GPU tier: could not {what} slot {slot} on device {_device.DeviceId} ({e.Message}); check the device (nvidia-smi, Xid errors in the kernel log)", e);

    public override string ToString() => $"GPU tier on {_device}: {SlotCount} slots of {BlockBytes} bytes";

    protected override void Dispose(bool disposing)
    {
        lock (_copyLock)
        {
            _device.DestroyStream(_stream);
            _device.Free(_arena);
        }
    }
}
