namespace KvFabric.Memory.Device;

// A device allocation: a device address (not dereferenceable from the host) and its length.
public readonly record struct DeviceBuffer(nint Pointer, long Length);

// Opaque handles in the CUDA sense: a stream orders copies; an event marks a point in a stream.
public readonly record struct DeviceStream(nint Handle);
public readonly record struct DeviceEvent(nint Handle);

public class DeviceMemoryException : Exception
{
    public DeviceMemoryException(string message) : base(message) { }
}

// Device memory and copies, the subset the GPU tier needs. Copies are asynchronous on a stream: the host buffer must
// stay valid (and, for managed memory, pinned) until the stream or a later event is synchronized.
public interface IDeviceMemory : IDisposable
{
    int DeviceId { get; }
    // True for host memory standing in for a GPU (no device present); false for a real device.
    bool IsEmulated { get; }
    long TotalBytes { get; }
    long FreeBytes { get; }
    // Bytes this instance has allocated and not freed.
    long AllocatedBytes { get; }

    DeviceBuffer Allocate(long bytes);
    void Free(DeviceBuffer buffer);

    DeviceStream CreateStream();
    void DestroyStream(DeviceStream stream);
    void SynchronizeStream(DeviceStream stream);

    DeviceEvent CreateEvent();
    void DestroyEvent(DeviceEvent e);
    void RecordEvent(DeviceEvent e, DeviceStream stream);
    void SynchronizeEvent(DeviceEvent e);

    unsafe void CopyToDeviceAsync(DeviceBuffer destination, long offset, void* source, long bytes, DeviceStream stream);
    unsafe void CopyToHostAsync(void* destination, DeviceBuffer source, long offset, long bytes, DeviceStream stream);

    // Page-locks host memory for fast copies to and from this device (cudaHostRegister); a no-op where not needed.
    void PinHost(nint address, long bytes);
    void UnpinHost(nint address);
}

public static class DeviceMemory
{
    // A CUDA device when libcudart finds one, otherwise host memory standing in for one (emulatedBytes of it).
    public static IDeviceMemory OpenDefault(int deviceId, long emulatedBytes) =>
        CudaDeviceMemory.IsAvailable ? new CudaDeviceMemory(deviceId) : new EmulatedDeviceMemory(emulatedBytes);

    internal static void CheckRange(DeviceBuffer buffer, long offset, long bytes)
    {
        if (offset < 0 || bytes < 0 || offset > buffer.Length || bytes > buffer.Length - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{bytes}) is outside the {buffer.Length}-byte device buffer at 0x{buffer.Pointer:x}");
    }
}
