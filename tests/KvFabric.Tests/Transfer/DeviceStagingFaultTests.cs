using KvFabric.Memory;
using KvFabric.Memory.Device;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using Xunit;
using static KvFabric.Tests.Transfer.DeviceBytes;

namespace KvFabric.Tests.Transfer;

/// <summary>Device staging when the device refuses a copy or a pin: the post reports it, and nothing stays rented or half-set.</summary>
public sealed class DeviceStagingFaultTests
{
    private const int Block = 1 << 20;

    /// <summary>The emulated device, with copies and pins that fail on request (as a CUDA error would).</summary>
    private sealed class FaultyDevice(EmulatedDeviceMemory inner) : IDeviceMemory
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



    [Fact]
    public async Task A_device_copy_that_fails_while_staging_a_write_gives_the_slots_back_and_the_request_can_be_posted_again()
    {
        using var device = new FaultyDevice(new EmulatedDeviceMemory(8 << 20));
        DeviceBuffer kv = device.Allocate(2L * Block);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 2 });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "host-side" });
        using var target = new AnonymousMemory(2L * Block);
        var targetRegion = peer.Register(target);
        var deviceRegion = agent.Register(device, kv);
        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());
        Upload(device, kv, 0, Pattern(5, Block));
        Upload(device, kv, Block, Pattern(6, Block));
        var write = agent.Prepare(TransferOp.Write, [deviceRegion.Descriptor(0, 2UL * Block)], remote, [targetRegion.Descriptor(0, 2UL * Block)],
            new TransferOptions { Deadline = TimeSpan.FromSeconds(5) });

        device.FailCopies = true;
        var failed = await agent.PostAsync(write);
        Assert.Equal(TransferStatus.Failed, failed.Status);
        Assert.Contains("injected", failed.Error, StringComparison.Ordinal);
        Assert.Equal(2, agent.Staging.Available); // every slot back

        device.FailCopies = false;
        var result = await agent.PostAsync(write);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(Pattern(5, Block), target.GetSpan(0, Block).ToArray());
        Assert.Equal(Pattern(6, Block), target.GetSpan(Block, Block).ToArray());
        Assert.Equal(2, agent.Staging.Available);
    }

    [Fact]
    public async Task Staging_that_takes_the_whole_deadline_times_the_post_out_instead_of_granting_a_second_deadline()
    {
        using var device = new FaultyDevice(new EmulatedDeviceMemory(8 << 20));
        DeviceBuffer kv = device.Allocate(2L * Block);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 2 });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "host-side" });
        using var target = new AnonymousMemory(2L * Block);
        var targetRegion = peer.Register(target);
        var deviceRegion = agent.Register(device, kv);
        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());
        Upload(device, kv, 0, Pattern(3, 2 * Block));
        var write = agent.Prepare(TransferOp.Write, [deviceRegion.Descriptor(0, 2UL * Block)], remote, [targetRegion.Descriptor(0, 2UL * Block)],
            new TransferOptions { Deadline = TimeSpan.FromMilliseconds(300) });

        // Copying out of the device takes 400 ms: the deadline has passed before anything could be sent.
        device.CopyOutDelayMs = 400;
        var late = await agent.PostAsync(write);
        Assert.Equal(TransferStatus.TimedOut, late.Status);
        Assert.Contains("whole deadline of 300 ms", late.Error, StringComparison.Ordinal);
        Assert.Equal(2, agent.Staging.Available);
        Assert.Equal(new byte[2 * Block], target.GetSpan(0, 2 * Block).ToArray()); // nothing sent

        device.CopyOutDelayMs = 0;
        var result = await agent.PostAsync(write);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(Pattern(3, 2 * Block), target.GetSpan(0, 2 * Block).ToArray());
    }

    [Fact]
    public async Task A_pin_that_fails_at_registration_is_tried_again_by_the_next_registration()
    {
        using var device = new FaultyDevice(new EmulatedDeviceMemory(8 << 20));
        DeviceBuffer kv = device.Allocate(Block);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 2 });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "host-side" });
        using var target = new AnonymousMemory(Block);
        var targetRegion = peer.Register(target);

        device.FailPins = true;
        Assert.Throws<DeviceMemoryException>(() => agent.Register(device, kv));
        device.FailPins = false;
        var deviceRegion = agent.Register(device, kv);

        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());
        Upload(device, kv, 0, Pattern(8, Block));
        var result = await agent.PostAsync(agent.Prepare(TransferOp.Write, [deviceRegion.Descriptor(0, Block)], remote, [targetRegion.Descriptor(0, Block)]));
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(Pattern(8, Block), target.GetSpan(0, Block).ToArray());
    }

    [Fact]
    public async Task Posts_that_together_need_more_slots_than_the_pool_holds_take_turns_instead_of_each_holding_part()
    {
        const int Chunk = 64 << 10, Posts = 12;
        using var device = new EmulatedDeviceMemory(64 << 20);
        DeviceBuffer kv = device.Allocate((long)Posts * 3 * Chunk);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 4, MaxChunkBytes = Chunk });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "host-side", MaxChunkBytes = Chunk });
        using var target = new AnonymousMemory((long)Posts * 3 * Chunk);
        var targetRegion = peer.Register(target);
        var deviceRegion = agent.Register(device, kv);
        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());
        // Each request needs 3 of the 4 slots: two posts that each took 2 would wait on each other until their deadline.
        var requests = Enumerable.Range(0, Posts).Select(p => agent.Prepare(TransferOp.Write, [deviceRegion.Descriptor((ulong)p * 3 * Chunk, 3UL * Chunk)], remote,
            [targetRegion.Descriptor((ulong)p * 3 * Chunk, 3UL * Chunk)], new TransferOptions { Deadline = TimeSpan.FromSeconds(3) })).ToArray();
        for (int round = 0; round < 5; round++)
        {
            var results = await Task.WhenAll(requests.Select(r => Task.Run(() => agent.PostAsync(r))));
            Assert.All(results, r => Assert.True(r.IsSuccess, r.ToString()));
        }
        Assert.Equal(4, agent.Staging.Available);
    }
}
