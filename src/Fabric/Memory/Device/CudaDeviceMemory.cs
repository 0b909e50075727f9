namespace KvFabric.Memory.Device;

// Device memory of one CUDA device through libcudart. Each call first selects the device, because the CUDA current
// device is per host thread and async continuations hop threads.
public sealed class CudaDeviceMemory : IDeviceMemory
{
    private static readonly Lazy<(bool Available, string Reason)> Probe = new(ProbeDevices);
    private readonly Lock _lock = new();
    private readonly Dictionary<nint, long> _allocations = [];
    private long _allocated;
    private bool _disposed;

    // True when libcudart loads and reports at least one device.
    public static bool IsAvailable => Probe.Value.Available;

    // Why IsAvailable is false (or the device count when it is true), for skip messages and logs.
    public static string AvailabilityReason => Probe.Value.Reason;

    private static (bool, string) ProbeDevices()
    {
        try
        {
            if (!CudaRuntime.TryLoad())
                return (false, "libcudart.so.12 was not found (no CUDA 12 runtime on the loader path, CUDA_HOME or /usr/local/cuda)");
            int error = CudaRuntime.GetDeviceCount(out int count);
            if (error != 0)
                return (false, $"cudaGetDeviceCount returned CUDA error {error} (no driver or no visible device)");
            return count > 0 ? (true, $"{count} CUDA device(s)") : (false, "cudaGetDeviceCount reports 0 devices");
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException)
        {
            return (false, $"libcudart could not be used: {e.Message}");
        }
    }

    public CudaDeviceMemory(int deviceId = 0)
    {
        if (!IsAvailable)
            throw new DeviceMemoryException($"no CUDA device: {AvailabilityReason}; use EmulatedDeviceMemory (DeviceMemory.OpenDefault picks it)");
        DeviceId = deviceId;
        CudaRuntime.Check(CudaRuntime.SetDevice(deviceId), $"cudaSetDevice({deviceId})");
        CudaRuntime.Check(CudaRuntime.MemGetInfo(out _, out nuint total), "cudaMemGetInfo");
        TotalBytes = (long)total;
    }

    public int DeviceId { get; }
    public bool IsEmulated => false;
    public long TotalBytes { get; }

    public long FreeBytes
    {
        get
        {
            Select();
            CudaRuntime.Check(CudaRuntime.MemGetInfo(out nuint free, out _), "cudaMemGetInfo");
            return (long)free;
        }
    }

    public long AllocatedBytes { get { lock (_lock) return _allocated; } }

    private void Select()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        CudaRuntime.Check(CudaRuntime.SetDevice(DeviceId), $"cudaSetDevice({DeviceId})");
    }

    public DeviceBuffer Allocate(long bytes)
    {
        if (bytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(bytes), bytes, "a device allocation needs a positive size");
        Select();
        int error = CudaRuntime.Malloc(out nint pointer, (nuint)bytes);
        if (error != 0)
            throw new DeviceMemoryException($"cudaMalloc of {bytes} bytes on device {DeviceId} failed (CUDA error {error}); {FreeBytes} bytes free: size the GPU tier smaller");
        lock (_lock)
        {
            _allocations.Add(pointer, bytes);
            _allocated += bytes;
        }
        return new DeviceBuffer(pointer, bytes);
    }

    public void Free(DeviceBuffer buffer)
    {
        lock (_lock)
        {
            if (!_allocations.Remove(buffer.Pointer, out long bytes))
                throw new ArgumentException($"0x{buffer.Pointer:x} is not a live allocation of CUDA device {DeviceId} (freed twice?)", nameof(buffer));
            _allocated -= bytes;
        }
        Select();
        CudaRuntime.Check(CudaRuntime.Free(buffer.Pointer), "cudaFree");
    }

    public DeviceStream CreateStream()
    {
        Select();
        CudaRuntime.Check(CudaRuntime.StreamCreate(out nint stream), "cudaStreamCreate");
        return new DeviceStream(stream);
    }

    public void DestroyStream(DeviceStream stream) => CudaRuntime.Check(CudaRuntime.StreamDestroy(stream.Handle), "cudaStreamDestroy");

    public void SynchronizeStream(DeviceStream stream) => CudaRuntime.Check(CudaRuntime.StreamSynchronize(stream.Handle), "cudaStreamSynchronize");

    public DeviceEvent CreateEvent()
    {
        Select();
        CudaRuntime.Check(CudaRuntime.EventCreate(out nint e), "cudaEventCreate");
        return new DeviceEvent(e);
    }

    public void DestroyEvent(DeviceEvent e) => CudaRuntime.Check(CudaRuntime.EventDestroy(e.Handle), "cudaEventDestroy");

    public void RecordEvent(DeviceEvent e, DeviceStream stream) => CudaRuntime.Check(CudaRuntime.EventRecord(e.Handle, stream.Handle), "cudaEventRecord");

    public void SynchronizeEvent(DeviceEvent e) => CudaRuntime.Check(CudaRuntime.EventSynchronize(e.Handle), "cudaEventSynchronize");

    public unsafe void CopyToDeviceAsync(DeviceBuffer destination, long offset, void* source, long bytes, DeviceStream stream)
    {
        DeviceMemory.CheckRange(destination, offset, bytes);
        Select();
        CudaRuntime.Check(CudaRuntime.MemcpyAsync(destination.Pointer + (nint)offset, (nint)source, (nuint)bytes, CudaRuntime.MemcpyHostToDevice, stream.Handle), "cudaMemcpyAsync (host to device)");
    }

    public unsafe void CopyToHostAsync(void* destination, DeviceBuffer source, long offset, long bytes, DeviceStream stream)
    {
        DeviceMemory.CheckRange(source, offset, bytes);
        Select();
        CudaRuntime.Check(CudaRuntime.MemcpyAsync((nint)destination, source.Pointer + (nint)offset, (nuint)bytes, CudaRuntime.MemcpyDeviceToHost, stream.Handle), "cudaMemcpyAsync (device to host)");
    }

    // cudaHostRegisterDefault (0): page-locks the range so copies to and from it are DMA, not staged by the driver.
    public void PinHost(nint address, long bytes)
    {
        Select();
        CudaRuntime.Check(CudaRuntime.HostRegister(address, (nuint)bytes, 0), $"cudaHostRegister of [0x{address:x}, +{bytes})");
    }

    public void UnpinHost(nint address) => CudaRuntime.Check(CudaRuntime.HostUnregister(address), $"cudaHostUnregister of 0x{address:x}");

    public override string ToString() => $"CUDA device {DeviceId} ({TotalBytes} bytes)";

    public void Dispose()
    {
        KeyValuePair<nint, long>[] left;
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            left = [.. _allocations];
            _allocations.Clear();
            _allocated = 0;
        }
        foreach (var (pointer, _) in left)
        {
            CudaRuntime.SetDevice(DeviceId);
            CudaRuntime.Free(pointer);
        }
    }
}
