using KvFabric.Memory;
using KvFabric.Memory.Device;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using Xunit;
using static KvFabric.Tests.Transfer.DeviceBytes;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// Device memory through the transfer layer, on the emulated device (no GPU here): its addresses cannot be dereferenced
/// from the host (PROT_NONE), so any path that touched device memory directly instead of staging it would crash.
/// </summary>
public sealed class DeviceTransferTests
{
    private const int Block = 1 << 20;

    private static unsafe Span<byte> Span(INativeMemory memory, long offset, int length) => new((byte*)memory.Address + offset, length);




    [Fact]
    public void Emulated_device_addresses_are_not_host_memory()
    {
        using var device = new EmulatedDeviceMemory(8 << 20);
        DeviceBuffer buffer = device.Allocate(4 << 20);
        string line = File.ReadLines("/proc/self/maps").First(l =>
        {
            var range = l.Split(' ')[0].Split('-');
            return Convert.ToUInt64(range[0], 16) <= (ulong)buffer.Pointer && (ulong)buffer.Pointer < Convert.ToUInt64(range[1], 16);
        });
        Assert.StartsWith("---p", line.Split(' ')[1], StringComparison.Ordinal); // no read, no write: a stray dereference faults
        Upload(device, buffer, 4096, Pattern(3, 8192));
        Assert.Equal(Pattern(3, 8192), Download(device, buffer, 4096, 8192));
        device.Free(buffer);
    }

    [Theory]
    [InlineData(false)] // the peer's region is private memory: TCP
    [InlineData(true)]  // the peer's region is a shared segment: shared memory
    public async Task Local_device_memory_is_staged_through_host_slots_for_writes_and_reads(bool sharedPeer)
    {
        using var device = new EmulatedDeviceMemory(16 << 20);
        DeviceBuffer kv = device.Allocate(6L * Block);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 4 });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "host-side" });
        INativeMemory target = sharedPeer ? SharedMemorySegment.Create(6L * Block, "devtest") : new AnonymousMemory(6L * Block);
        using var owner = (IDisposable)target;
        var targetRegion = peer.Register(target);
        var deviceRegion = agent.Register(device, kv);
        Assert.Equal(MemoryKind.Device, deviceRegion.Kind);
        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());

        // WRITE device blocks 0..3 (4 chunks: the whole staging pool) to the peer, with a checksum and a notification.
        for (int i = 0; i < 4; i++)
            Upload(device, kv, (long)i * Block, Pattern(10 + (ulong)i, Block));
        MemoryDescriptor[] local = [.. Enumerable.Range(0, 4).Select(i => deviceRegion.Descriptor((ulong)i * Block, Block))];
        MemoryDescriptor[] far = [.. Enumerable.Range(0, 4).Select(i => targetRegion.Descriptor((ulong)(3 - i) * Block, Block))];
        var write = agent.Prepare(TransferOp.Write, local, remote, far, new TransferOptions { Checksum = ChecksumKind.XxHash3, Notification = new byte[] { 1, 2 } });
        Assert.Equal(sharedPeer ? BackendKind.SharedMemory : BackendKind.Tcp, write.Backend);
        for (int round = 0; round < 2; round++) // re-posted: the staging is per post
        {
            var result = await agent.PostAsync(write);
            Assert.True(result.IsSuccess, result.ToString());
            for (int i = 0; i < 4; i++)
                Assert.Equal(Pattern(10 + (ulong)i, Block), Span(target, (long)(3 - i) * Block, Block).ToArray());
            Assert.Equal([1, 2], (await peer.Notifications.ReadAsync()).Message);
        }
        Assert.Equal(4, agent.Staging.Available); // every slot back
        // The staging slots are the agent's own: not in Regions, not in the metadata peers load.
        Assert.Equal([deviceRegion], agent.Regions);
        Assert.Single(agent.GetMetadata().Regions);
        Assert.Throws<TransferException>(() => agent.GetMetadata(agent.Staging.Regions));

        // READ the peer's blocks 4..5 into device blocks 4..5.
        Span(target, 4L * Block, 2 * Block).Clear();
        DataPattern.Fill(Span(target, 4L * Block, Block), 40, 0);
        DataPattern.Fill(Span(target, 5L * Block, Block), 50, 0);
        var read = agent.Prepare(TransferOp.Read, [deviceRegion.Descriptor(4UL * Block, 2UL * Block)], remote, [targetRegion.Descriptor(4UL * Block, 2UL * Block)],
            new TransferOptions { Checksum = ChecksumKind.Crc32C });
        Assert.True((await agent.PostAsync(read)).IsSuccess);
        Assert.Equal(Pattern(40, Block), Download(device, kv, 4L * Block, Block));
        Assert.Equal(Pattern(50, Block), Download(device, kv, 5L * Block, Block));
        Assert.Equal(4, agent.Staging.Available);

        // More device chunks than staging slots in one request: refused at Prepare, with what to do.
        MemoryDescriptor[] five = [.. Enumerable.Range(0, 5).Select(i => deviceRegion.Descriptor((ulong)i * Block, Block))];
        MemoryDescriptor[] fiveFar = [.. Enumerable.Range(0, 5).Select(i => targetRegion.Descriptor((ulong)i * Block, Block))];
        var e = Assert.Throws<TransferException>(() => agent.Prepare(TransferOp.Write, five, remote, fiveFar));
        Assert.Contains("DeviceStagingSlots", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_peers_device_region_is_reached_over_tcp_with_its_side_staging_and_device_to_device_works()
    {
        using var gpuA = new EmulatedDeviceMemory(8 << 20, deviceId: 0);
        using var gpuB = new EmulatedDeviceMemory(8 << 20, deviceId: 1);
        DeviceBuffer a = gpuA.Allocate(4L * Block), b = gpuB.Allocate(4L * Block);
        await using var prefill = new TransferAgent(new TransferAgentOptions { Name = "prefill" });
        await using var decode = new TransferAgent(new TransferAgentOptions { Name = "decode" });
        var regionA = prefill.Register(gpuA, a);
        var regionB = decode.Register(gpuB, b);
        using var host = new AnonymousMemory(2L * Block);
        var hostRegion = prefill.Register(host);
        var remote = await prefill.LoadRemoteAsync(decode.ExportMetadata());

        // GPU to GPU: staged out of A on this side, into B on the peer's side, checksum verified in between.
        for (int i = 0; i < 4; i++)
            Upload(gpuA, a, (long)i * Block, Pattern(70 + (ulong)i, Block));
        var d2d = prefill.Prepare(TransferOp.Write, [regionA.Descriptor(0, 4UL * Block)], remote, [regionB.Descriptor(0, 4UL * Block)],
            new TransferOptions { Checksum = ChecksumKind.XxHash3, Notification = new byte[] { 9 } });
        Assert.Equal(BackendKind.Tcp, d2d.Backend);
        var result = await prefill.PostAsync(d2d);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal([9], (await decode.Notifications.ReadAsync()).Message);
        for (int i = 0; i < 4; i++)
            Assert.Equal(Pattern(70 + (ulong)i, Block), Download(gpuB, b, (long)i * Block, Block));

        // Host memory READ from the peer's device region.
        var read = prefill.Prepare(TransferOp.Read, [hostRegion.Descriptor(0, 2UL * Block)], remote, [regionB.Descriptor(Block, 2UL * Block)],
            new TransferOptions { Checksum = ChecksumKind.Crc32C });
        Assert.True((await prefill.PostAsync(read)).IsSuccess);
        Assert.Equal(Pattern(71, Block), host.GetSpan(0, Block).ToArray());
        Assert.Equal(Pattern(72, Block), host.GetSpan(Block, Block).ToArray());

        // Shared memory and UCX cannot address a device region: forcing them is refused with the reason.
        var shm = Assert.Throws<TransferException>(() => prefill.Prepare(TransferOp.Write, [hostRegion.Descriptor(0, Block)], remote,
            [regionB.Descriptor(0, Block)], new TransferOptions { Backend = BackendKind.SharedMemory }));
        Assert.Contains("Device", shm.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Concurrent_device_posts_share_the_staging_pool_without_waiting_each_other_out()
    {
        using var device = new EmulatedDeviceMemory(32 << 20);
        DeviceBuffer kv = device.Allocate(12L * Block);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-side", DeviceStagingSlots = 4 });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "host-side" });
        using var target = new AnonymousMemory(12L * Block);
        var targetRegion = peer.Register(target);
        var deviceRegion = agent.Register(device, kv);
        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());
        for (int i = 0; i < 12; i++)
            Upload(device, kv, (long)i * Block, Pattern(100 + (ulong)i, Block));

        // Four requests of three device chunks each against four slots: at most one can hold its slots at a time.
        var requests = Enumerable.Range(0, 4).Select(r => agent.Prepare(TransferOp.Write,
            [.. Enumerable.Range(3 * r, 3).Select(i => deviceRegion.Descriptor((ulong)i * Block, Block))], remote,
            [.. Enumerable.Range(3 * r, 3).Select(i => targetRegion.Descriptor((ulong)i * Block, Block))],
            new TransferOptions { Deadline = TimeSpan.FromSeconds(30) })).ToArray();
        for (int round = 0; round < 5; round++)
        {
            TransferResult[] results = await Task.WhenAll(requests.Select(r => Task.Run(() => agent.PostAsync(r))));
            Assert.All(results, r => Assert.True(r.IsSuccess, r.ToString()));
        }
        for (int i = 0; i < 12; i++)
            Assert.Equal(Pattern(100 + (ulong)i, Block), Span(target, (long)i * Block, Block).ToArray());
        Assert.Equal(4, agent.Staging.Available);
    }

    [Fact]
    public async Task Over_ucx_local_device_chunks_are_staged_and_a_peers_unmapped_device_region_is_refused()
    {
        using var device = new EmulatedDeviceMemory(8 << 20);
        DeviceBuffer kv = device.Allocate(2L * Block);
        var ucx = new Dictionary<string, string> { ["TLS"] = "posix,self" };
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "gpu-ucx", EnableUcx = true, UcxSettings = ucx });
        await using var peer = new TransferAgent(new TransferAgentOptions { Name = "peer-ucx", EnableUcx = true, UcxSettings = ucx });
        Assert.True(agent.UcxAvailable, agent.UcxUnavailableReason);
        using var peerDevice = new EmulatedDeviceMemory(4 << 20, deviceId: 1);
        var peerDeviceRegion = peer.Register(peerDevice, peerDevice.Allocate(Block));
        var target = peer.AllocateUcx(2L * Block);
        var deviceRegion = agent.Register(device, kv);
        var remote = await agent.LoadRemoteAsync(peer.ExportMetadata());
        // Debian's UCX is not CUDA-aware: device regions get no rkey, so UCX never sees a device address.
        Assert.True(remote.Metadata.Regions.Single(r => r.Id == peerDeviceRegion.Id).UcxRkey.IsEmpty);

        Upload(device, kv, 0, Pattern(81, Block));
        Upload(device, kv, Block, Pattern(82, Block));
        var write = agent.Prepare(TransferOp.Write, [deviceRegion.Descriptor(0, 2UL * Block)], remote, [target.Region.Descriptor(0, 2UL * Block)],
            new TransferOptions { Backend = BackendKind.Ucx, Checksum = ChecksumKind.XxHash3 });
        var result = await agent.PostAsync(write);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(Pattern(81, Block), target.GetSpan(0, Block).ToArray());
        Assert.Equal(Pattern(82, Block), target.GetSpan(Block, Block).ToArray());

        var e = Assert.Throws<TransferException>(() => agent.Prepare(TransferOp.Write, [deviceRegion.Descriptor(0, Block)], remote,
            [peerDeviceRegion.Descriptor(0, Block)], new TransferOptions { Backend = BackendKind.Ucx }));
        Assert.Contains("did not map for UCX", e.Message, StringComparison.Ordinal);
    }
}
