namespace KvFabric.Memory.Device;

// Host memory standing in for a GPU where none is present, so the GPU tier and its tests run everywhere. Same
// accounting and copy API as CudaDeviceMemory; copies complete at once (a stream is trivially in order), so streams and
// events are tokens only. Every allocation is a private anonymous mapping, like cudaMalloc's, never GC memory. As with a
// real GPU, the "device address" handed out cannot be dereferenced from the host: it is a reserved range mapped with no
// access (touching it is a segfault), and only the copy methods reach the bytes, which live in a separate mapping. Code
// that would read a device pointer directly fails here as it would on a GPU.
public sealed class EmulatedDeviceMemory : IDeviceMemory
{
    private const int ProtNone = 0, MapNoReserve = 0x4000;
    private readonly Dictionary<nint, (AnonymousMemory Data, nuint Reserved)> _allocations = [];
    private readonly Lock _lock = new();
    private long _allocated;
    private long _nextHandle;
    private bool _disposed;

    public EmulatedDeviceMemory(long totalBytes, int deviceId = 0)
    {
        if (totalBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(totalBytes), totalBytes, "emulated device memory needs a positive size in bytes");
        TotalBytes = totalBytes;
        DeviceId = deviceId;
    }

    public int DeviceId { get; }
    public bool IsEmulated => true;
    public long TotalBytes { get; }
    public long FreeBytes { get { lock (_lock) return TotalBytes - _allocated; } }
    public long AllocatedBytes { get { lock (_lock) return _allocated; } }

    public DeviceBuffer Allocate(long bytes)
    {
        if (bytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(bytes), bytes, "a device allocation needs a positive size");
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (bytes > TotalBytes - _allocated)
                throw new DeviceMemoryException($"emulated device {DeviceId} is out of memory: {bytes} bytes asked, {TotalBytes - _allocated} of {TotalBytes} free; free buffers or size the GPU tier smaller");
            var memory = new AnonymousMemory(bytes);
            nint device = Native.Libc.Mmap(0, (nuint)bytes, ProtNone, Native.Libc.MAP_PRIVATE | Native.Libc.MAP_ANONYMOUS | MapNoReserve, -1, 0);
            if (device == Native.Libc.MapFailed)
            {
                memory.Dispose();
                throw new DeviceMemoryException($"emulated device {DeviceId}: cannot reserve {bytes} bytes of address space ({Native.Libc.LastError()})");
            }
            _allocations.Add(device, (memory, (nuint)bytes));
            _allocated += bytes;
            return new DeviceBuffer(device, bytes);
        }
    }

    public void Free(DeviceBuffer buffer)
    {
        lock (_lock)
        {
            if (!_allocations.Remove(buffer.Pointer, out var a))
                throw new ArgumentException($"0x{buffer.Pointer:x} is not a live allocation of emulated device {DeviceId} (freed twice?)", nameof(buffer));
            _allocated -= a.Data.Length;
            Release(buffer.Pointer, a);
        }
    }

    public DeviceStream CreateStream() => new((nint)Interlocked.Increment(ref _nextHandle));
    public void DestroyStream(DeviceStream stream) { }
    public void SynchronizeStream(DeviceStream stream) { }
    public DeviceEvent CreateEvent() => new((nint)Interlocked.Increment(ref _nextHandle));
    public void DestroyEvent(DeviceEvent e) { }
    public void RecordEvent(DeviceEvent e, DeviceStream stream) { }
    public void SynchronizeEvent(DeviceEvent e) { }

    public unsafe void CopyToDeviceAsync(DeviceBuffer destination, long offset, void* source, long bytes, DeviceStream stream)
    {
        DeviceMemory.CheckRange(destination, offset, bytes);
        Buffer.MemoryCopy(source, (byte*)Data(destination) + offset, bytes, bytes);
    }

    public unsafe void CopyToHostAsync(void* destination, DeviceBuffer source, long offset, long bytes, DeviceStream stream)
    {
        DeviceMemory.CheckRange(source, offset, bytes);
        Buffer.MemoryCopy((byte*)Data(source) + offset, destination, bytes, bytes);
    }

    public void PinHost(nint address, long bytes)
    {
        // Host memory needs no page-locking to be copied to an emulated device.
    }

    public void UnpinHost(nint address)
    {
    }

    // The host mapping behind a device address (copies only).
    private nint Data(DeviceBuffer buffer)
    {
        lock (_lock)
        {
            return _allocations.TryGetValue(buffer.Pointer, out var a) && buffer.Length <= a.Data.Length
                ? a.Data.Address
                : throw new ArgumentException($"0x{buffer.Pointer:x} (+{buffer.Length}) is not a live allocation of emulated device {DeviceId}", nameof(buffer));
        }
    }

    private static void Release(nint device, (AnonymousMemory Data, nuint Reserved) a)
    {
        Native.Libc.Munmap(device, a.Reserved);
        a.Data.Dispose();
    }

    public override string ToString() => $"emulated device {DeviceId} (host memory standing in for a GPU, {TotalBytes} bytes)";

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            foreach (var (device, a) in _allocations)
                Release(device, a);
            _allocations.Clear();
            _allocated = 0;
        }
    }
}
