using KvFabric.Memory.Device;
using KvFabric.Tiers;
using KvFabric.Tiers.Stores;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// Emulated device memory whose copies fail on demand, as a CUDA copy does after a device fault.
public sealed class GpuStoreFaultTests
{
    // IBlockStore: an I/O failure is a TierException, so the tier manager loses only that placement and tries the next
    // tier. A failed device copy must not escape the GPU store as a raw DeviceMemoryException that fails the whole put.
    [Fact]
    public async Task A_failing_device_copy_loses_only_the_gpu_placement()
    {
        const int size = 4096;
        using var device = new FaultyDeviceMemory(new EmulatedDeviceMemory(1 << 20));
        var host = new InMemoryTestStore(TierKind.Host, 4 * size);
        await using var manager = new TierManager(new TierManagerOptions
        {
            Tiers =
            [
                new TierOptions { Store = new GpuBlockStore(device, size, 2), Policy = new TestLruPolicy() },
                new TierOptions { Store = host, Policy = new TestLruPolicy() },
            ],
            PromoteOnHit = false,
        });
        device.FailCopies = true;
        var put = await manager.PutAsync(1, null, Chain(0, 1, size));
        Assert.Equal(PutStatus.Stored, put.Status);
        Assert.Equal(2, manager.Residency(new BlockKey(1, Hash(0)))); // in the host tier
        var stats = manager.Stats();
        Assert.Equal(1, stats.Tiers[0].StoreErrors);
        Assert.Equal(0, manager.GetStore(TierKind.Gpu).Count);

        // A read that fails on the device ends the read (counted), rather than throwing at the caller.
        device.FailCopies = false;
        Assert.Equal(PutStatus.Stored, (await manager.PutAsync(1, null, Chain(10, 1, size))).Status);
        device.FailCopies = true;
        var buffer = new byte[size];
        Assert.Equal(0, await manager.GetAsync(1, new[] { Hash(10) }, [buffer]));
        Assert.Equal(2, manager.Stats().Tiers[0].StoreErrors);
    }
}
