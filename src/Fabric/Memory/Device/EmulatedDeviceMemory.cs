namespace KvFabric.Memory.Device;

// Host memory standing in for a GPU where none is present, so the GPU tier and its tests run everywhere. Same
// accounting and copy API as CudaDeviceMemory; copies complete at once (a stream is trivially in order), so streams and
// events are tokens only. Every allocation is a private anonymous mapping, like cudaMalloc's, never GC memory.
public sealed class EmulatedDeviceMemory : IDeviceMemory
{
    private readonly Dictionary<nint, AnonymousMemory> _allocations = [];
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
            _allocations.Add(memory.Address, memory);
            _allocated += bytes;
            return new DeviceBuffer(memory.Address, bytes);
        }
    }

    public void Free(DeviceBuffer buffer)
    {
        lock (_lock)
        {
            if (!_allocations.Remove(buffer.Pointer, out var memory))
                throw new ArgumentException($"0x{buffer.Pointer:x} is not a live allocation of emulated device {DeviceId} (freed twice?)", nameof(buffer));
            _allocated -= memory.Length;
            memory.Dispose();
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
        Buffer.MemoryCopy(source, (byte*)destination.Pointer + offset, bytes, bytes);
    }

    public unsafe void CopyToHostAsync(void* destination, DeviceBuffer source, long offset, long bytes, DeviceStream stream)
    {
        DeviceMemory.CheckRange(source, offset, bytes);
        Buffer.MemoryCopy((byte*)source.Pointer + offset, destination, bytes, bytes);
    }

    public override string ToString() => $"emulated device {DeviceId} (host memory standing in for a GPU, {TotalBytes} bytes)";

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            foreach (var memory in _allocations.Values)
                memory.Dispose();
            _allocations.Clear();
            _allocated = 0;
        }
    }
}
