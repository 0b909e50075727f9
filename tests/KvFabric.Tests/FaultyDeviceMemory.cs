using KvFabric.Memory.Device;

namespace KvFabric.Tests;

/// <summary>The emulated device, with copies and pins that fail on request (as a CUDA error would).</summary>
internal sealed class FaultyDeviceMemory(EmulatedDeviceMemory inner) : IDeviceMemory
{
    public volatile bool FailCopies;
    public volatile bool FailPins;
    public int DeviceId => inner.DeviceId;
    public bool IsEmulated => true;
    public long TotalBytes => inner.TotalBytes;
    public long FreeBytes => inner.FreeBytes;
    public long AllocatedBytes => inner.AllocatedBytes;
    public DeviceBuffer Allocate(long bytes) => inner.Allocate(bytes);
    public void Free(DeviceBuffer buffer) => inner.Free(buffer);
    public DeviceStream CreateStream() => inner.CreateStream();
    public void DestroyStream(DeviceStream stream) => inner.DestroyStream(stream);
    public void SynchronizeStream(DeviceStream stream) => inner.SynchronizeStream(stream);
    public DeviceEvent CreateEvent() => inner.CreateEvent();
    public void DestroyEvent(DeviceEvent e) => inner.DestroyEvent(e);
    public void RecordEvent(DeviceEvent e, DeviceStream stream) => inner.RecordEvent(e, stream);
    public void SynchronizeEvent(DeviceEvent e) => inner.SynchronizeEvent(e);

    public unsafe void CopyToDeviceAsync(DeviceBuffer destination, long offset, void* source, long bytes, DeviceStream stream)
    {
        if (FailCopies)
            throw new DeviceMemoryException("injected: cudaMemcpyAsync failed");
        inner.CopyToDeviceAsync(destination, offset, source, bytes, stream);
    }

    /// <summary>When positive, each copy out of the device first takes this long (a busy or slow device).</summary>
    public volatile int CopyOutDelayMs;

    public unsafe void CopyToHostAsync(void* destination, DeviceBuffer source, long offset, long bytes, DeviceStream stream)
    {
        if (CopyOutDelayMs > 0)
            Thread.Sleep(CopyOutDelayMs);
        if (FailCopies)
            throw new DeviceMemoryException("injected: cudaMemcpyAsync failed");
        inner.CopyToHostAsync(destination, source, offset, bytes, stream);
    }

    public void PinHost(nint address, long bytes)
    {
        if (FailPins)
            throw new DeviceMemoryException("injected: cudaHostRegister failed");
        inner.PinHost(address, bytes);
    }

    public void UnpinHost(nint address) => inner.UnpinHost(address);
    public void Dispose() => inner.Dispose();
}
