using KvFabric.Memory;
using KvFabric.Memory.Device;
using KvFabric.Tiers;
using KvFabric.Tiers.Stores;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// A [Fact] that is reported as skipped, with the reason, where no CUDA device is present.
public sealed class CudaFactAttribute : FactAttribute
{
    public CudaFactAttribute()
    {
        if (!CudaDeviceMemory.IsAvailable)
            Skip = $"NOT RUN: needs a CUDA GPU, and CudaDeviceMemory.IsAvailable is false here ({CudaDeviceMemory.AvailabilityReason}); the emulated device tests cover the same store code";
    }
}

public sealed class TierStoreTests
{
    private static BlockKey Key(int n) => new(7, Hash(n));

    private static async Task RoundTripAndAccount(SlottedBlockStore store)
    {
        int size = store.BlockBytes;
        for (int i = 0; i < store.SlotCount; i++)
            Assert.True(await store.WriteAsync(Key(i), new BlockMeta(default, 0, size), Bytes(i, size)));
        Assert.False(await store.WriteAsync(Key(99), new BlockMeta(default, 0, size), Bytes(99, size)));
        Assert.Equal(store.CapacityBytes, store.UsedBytes);
        Assert.Equal(store.SlotCount, store.Count);

        var buffer = new byte[size];
        for (int i = 0; i < store.SlotCount; i++)
        {
            Assert.True(await store.ReadAsync(Key(i), buffer));
            Assert.Equal(Bytes(i, size), buffer);
        }
        Assert.True(store.Remove(Key(1)));
        Assert.False(store.Remove(Key(1)));
        Assert.False(await store.ReadAsync(Key(1), buffer));
        Assert.True(await store.WriteAsync(Key(99), new BlockMeta(default, 0, size), Bytes(99, size)));
        Assert.True(await store.ReadAsync(Key(99), buffer));
        Assert.Equal(Bytes(99, size), buffer);

        Assert.Contains("slots hold exactly", (await Assert.ThrowsAsync<ArgumentException>(async () =>
            await store.WriteAsync(Key(5), default, new byte[size + 1]))).Message);
    }

    [Fact]
    public async Task The_host_store_keeps_blocks_in_pool_slots_with_exact_accounting()
    {
        using var store = new HostBlockStore(blockBytes: 4096 + 100, slotCount: 4);
        Assert.Equal(TierKind.Host, store.Kind);
        Assert.False(store.IsShared);
        await RoundTripAndAccount(store);
        Assert.False(store.TryGetSharedLocation(Key(0), out _));
    }

    [Fact]
    public async Task A_shared_host_store_tells_a_local_reader_where_a_block_lives()
    {
        using var store = new HostBlockStore(blockBytes: 5000, slotCount: 3, shared: true);
        await store.WriteAsync(Key(1), default, Bytes(1, 5000));
        await store.WriteAsync(Key(2), default, Bytes(2, 5000));
        Assert.True(store.TryGetSharedLocation(Key(2), out var at));
        Assert.StartsWith("/dev/shm/kvfabric-", at.SegmentPath, StringComparison.Ordinal);
        // What another process on this host would do: map the segment by name and read the bytes in place.
        using var peer = SharedMemorySegment.Open(at.SegmentPath, at.SegmentLength);
        Assert.Equal(Bytes(2, 5000), peer.GetSpan(at.Offset, at.Length).ToArray());
        Assert.False(store.TryGetSharedLocation(Key(3), out _));
    }

    [Fact]
    public async Task The_gpu_store_on_an_emulated_device_round_trips_and_accounts_device_memory()
    {
        using var device = new EmulatedDeviceMemory(1 << 20);
        Assert.Contains("emulated", device.ToString(), StringComparison.Ordinal);
        using (var store = new GpuBlockStore(device, blockBytes: 8192, slotCount: 8))
        {
            Assert.Equal(TierKind.Gpu, store.Kind);
            Assert.Equal(8 * 8192, device.AllocatedBytes);
            Assert.Equal((1 << 20) - 8 * 8192, device.FreeBytes);
            Assert.Contains("emulated", store.ToString(), StringComparison.Ordinal);
            await RoundTripAndAccount(store);
            Assert.True(store.TryGetDeviceAddress(Key(0), out nint address));
            Assert.NotEqual(0, address);
        }
        Assert.Equal(0, device.AllocatedBytes);
        Assert.Contains("out of memory", Assert.Throws<DeviceMemoryException>(() => device.Allocate(2 << 20)).Message);
        Assert.Contains("freed twice", Assert.Throws<ArgumentException>(() => device.Free(new DeviceBuffer(1234, 10))).Message);
    }

    [Fact]
    public void The_default_device_is_emulated_exactly_when_no_cuda_device_is_present()
    {
        using var device = DeviceMemory.OpenDefault(0, emulatedBytes: 1 << 16);
        Assert.Equal(!CudaDeviceMemory.IsAvailable, device.IsEmulated);
    }

    [CudaFact]
    public async Task The_gpu_store_on_a_cuda_device_round_trips_through_device_memory()
    {
        using var device = new CudaDeviceMemory(0);
        Assert.False(device.IsEmulated);
        long freeBefore = device.FreeBytes;
        using var store = new GpuBlockStore(device, blockBytes: 1 << 20, slotCount: 4);
        Assert.Equal(4L << 20, device.AllocatedBytes);
        Assert.True(device.FreeBytes < freeBefore);
        await RoundTripAndAccount(store);

        var e = device.CreateEvent();
        var stream = device.CreateStream();
        device.RecordEvent(e, stream);
        device.SynchronizeEvent(e);
        device.DestroyEvent(e);
        device.DestroyStream(stream);
    }

    [Fact]
    public async Task A_tier_manager_over_the_real_stores_moves_blocks_from_the_gpu_to_host_memory()
    {
        const int size = 4096;
        using var device = new EmulatedDeviceMemory(1 << 20);
        await using var manager = new TierManager(new TierManagerOptions
        {
            Tiers =
            [
                new TierOptions { Store = new GpuBlockStore(device, size, 2), Policy = new TestLruPolicy() },
                new TierOptions { Store = new HostBlockStore(size, 4, shared: true), Policy = new TestLruPolicy() },
            ],
        });
        var put = await manager.PutAsync(3, null, Chain(0, 4, size));
        Assert.Equal(PutStatus.Stored, put.Status);
        var tiers = new TierKind[4];
        Assert.Equal(new LookupResult(4, 4), manager.Lookup(3, Hashes(0, 4), tiers));
        Assert.Equal([TierKind.Gpu, TierKind.Gpu, TierKind.Host, TierKind.Host], tiers);

        var buffers = Enumerable.Range(0, 4).Select(_ => new byte[size]).ToArray();
        Assert.Equal(4, await manager.GetAsync(3, Hashes(0, 4), buffers.Select(b => (Memory<byte>)b).ToArray()));
        for (int i = 0; i < 4; i++)
            Assert.Equal(Bytes(i, size), buffers[i]);

        var host = (HostBlockStore)manager.GetStore(TierKind.Host);
        using var use = manager.Acquire(3, Hashes(0, 4));
        Assert.True(host.TryGetSharedLocation(new BlockKey(3, Hash(3)), out var at));
        Assert.Equal(size, at.Length);
        // A block of the wrong size is refused up front, before any tier changes.
        Assert.Contains("stores blocks of exactly 4096", (await Assert.ThrowsAsync<ArgumentException>(async () =>
            await manager.PutAsync(3, null, Chain(10, 1, size - 1)))).Message, StringComparison.Ordinal);
    }
}
