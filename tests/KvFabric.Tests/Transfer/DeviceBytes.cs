using KvFabric.Memory.Device;
using KvFabric.Transfer.Diagnostics;

namespace KvFabric.Tests.Transfer;

/// <summary>Test bytes in and out of device memory, through the device's own copies only.</summary>
internal static class DeviceBytes
{
    public static byte[] Pattern(ulong seed, int length)
    {
        var bytes = new byte[length];
        DataPattern.Fill(bytes, seed, 0);
        return bytes;
    }

    public static unsafe void Upload(IDeviceMemory device, DeviceBuffer buffer, long offset, byte[] bytes)
    {
        var stream = device.CreateStream();
        fixed (byte* p = bytes)
            device.CopyToDeviceAsync(buffer, offset, p, bytes.Length, stream);
        device.SynchronizeStream(stream);
        device.DestroyStream(stream);
    }

    public static unsafe byte[] Download(IDeviceMemory device, DeviceBuffer buffer, long offset, int length)
    {
        var bytes = new byte[length];
        var stream = device.CreateStream();
        fixed (byte* p = bytes)
            device.CopyToHostAsync(p, buffer, offset, length, stream);
        device.SynchronizeStream(stream);
        device.DestroyStream(stream);
        return bytes;
    }
}
