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

    /// <summary>A faulty device with two blocks of KV, an agent staging through two slots, and a host-memory peer.</summary>
    private sealed class Rig : IAsyncDisposable
    {
        public FaultyDeviceMemory Device { get; } = new(new EmulatedDeviceMemory(8 << 20));
        public DeviceBuffer Kv { get; }
        public TransferAgent Agent { get; } = new(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 2 });
        public TransferAgent Peer { get; } = new(new TransferAgentOptions { Name = "host-side" });
        public AnonymousMemory Target { get; } = new(2L * Block);
        public RegisteredRegion TargetRegion { get; }
        public RegisteredRegion DeviceRegion { get; }

        private Rig()
        {
            Kv = Device.Allocate(2L * Block);
            TargetRegion = Peer.Register(Target);
            DeviceRegion = Agent.Register(Device, Kv);
        }

        private RemoteAgent _remote = null!;

        // The rig and a WRITE of both device blocks to the peer.
        public static async Task<(Rig Rig, TransferRequest Write)> StartAsync(TimeSpan deadline)
        {
            var rig = new Rig();
            rig._remote = await rig.Agent.LoadRemoteAsync(rig.Peer.ExportMetadata());
            return (rig, rig.Write(deadline));
        }

        public TransferRequest Write(TimeSpan deadline) =>
            Agent.Prepare(TransferOp.Write, [DeviceRegion.Descriptor(0, 2UL * Block)], _remote, [TargetRegion.Descriptor(0, 2UL * Block)],
                new TransferOptions { Deadline = deadline });

        public async ValueTask DisposeAsync()
        {
            await Agent.DisposeAsync();
            await Peer.DisposeAsync();
            Target.Dispose();
            Device.Dispose();
        }
    }

    [Fact]
    public async Task A_device_copy_that_fails_while_staging_a_write_gives_the_slots_back_and_the_request_can_be_posted_again()
    {
        var (rig, write) = await Rig.StartAsync(TimeSpan.FromSeconds(5));
        await using var _ = rig;
        var (device, agent, target) = (rig.Device, rig.Agent, rig.Target);
        Upload(device, rig.Kv, 0, Pattern(5, Block));
        Upload(device, rig.Kv, Block, Pattern(6, Block));

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
        var (rig, write) = await Rig.StartAsync(TimeSpan.FromMilliseconds(300));
        await using var _ = rig;
        var (device, agent, target) = (rig.Device, rig.Agent, rig.Target);
        Upload(device, rig.Kv, 0, Pattern(3, 2 * Block));

        // Copying out of the device takes 400 ms: the deadline has passed before anything could be sent.
        device.CopyOutDelayMs = 400;
        var late = await agent.PostAsync(write);
        Assert.Equal(TransferStatus.TimedOut, late.Status);
        Assert.Contains("whole deadline of 300 ms", late.Error, StringComparison.Ordinal);
        Assert.Equal(2, agent.Staging.Available);
        Assert.Equal(new byte[2 * Block], target.GetSpan(0, 2 * Block).ToArray()); // nothing sent

        // With the device back to normal (and a deadline a cold first connection on a loaded machine meets), it goes.
        device.CopyOutDelayMs = 0;
        var result = await agent.PostAsync(rig.Write(TimeSpan.FromSeconds(10)));
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(Pattern(3, 2 * Block), target.GetSpan(0, 2 * Block).ToArray());
    }

    [Fact]
    public async Task A_pin_that_fails_at_registration_is_tried_again_by_the_next_registration()
    {
        using var device = new FaultyDeviceMemory(new EmulatedDeviceMemory(8 << 20));
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
