using System.Diagnostics;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Transfer;

[CollectionDefinition("multi-process", DisableParallelization = true)]
public sealed class MultiProcessCollection;

/// <summary>READ and WRITE against a separate `kvfabric peer` process, over both backends, verified byte for byte.</summary>
[Collection("multi-process")]
public sealed class MultiProcessTransferTests
{
    private const int BlockBytes = 2 << 20;

    public static TheoryData<BackendKind, TransferOp, int> Cases()
    {
        var data = new TheoryData<BackendKind, TransferOp, int>();
        foreach (var backend in new[] { BackendKind.Tcp, BackendKind.SharedMemory })
        {
            foreach (var op in new[] { TransferOp.Write, TransferOp.Read })
            {
                data.Add(backend, op, 1);
                data.Add(backend, op, 256);
            }
        }
        return data;
    }

    /// <summary>Remote block i goes to local slot (n-1-i): a block landing at the wrong offset cannot go unnoticed.</summary>
    private static (MemoryDescriptor[] Local, MemoryDescriptor[] Remote) Pair(HostBlockPool pool, TransferPeerProcess peer, int n) =>
        TransferPairs.Reversed(pool, peer, n, BlockBytes);

    [Theory]
    [MemberData(nameof(Cases))]
    public async Task Blocks_arrive_byte_for_byte(BackendKind backend, TransferOp op, int blocks)
    {
        await using var peer = await TransferPeerProcess.StartAsync(blocks * 2, shm: backend == BackendKind.SharedMemory);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "test" });
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        const ulong seed = 0xC0FFEE;
        if (op == TransferOp.Write)
        {
            for (int i = 0; i < blocks; i++)
                DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), seed, (long)i * BlockBytes);
        }
        else
        {
            Assert.Equal("OK", await peer.CommandAsync($"FILL 0 {(long)blocks * BlockBytes} {seed}"));
        }

        var request = agent.Prepare(op, local, remote, remoteDescs, new TransferOptions { Backend = backend });
        Assert.Equal(backend, request.Backend);
        var result = await agent.PostAsync(request);

        Assert.True(result.IsSuccess, result.ToString());
        for (int i = 0; i < blocks; i++)
            Assert.Equal(DescriptorStatus.Done, request.GetStatus(i));
        if (op == TransferOp.Write)
        {
            Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {(long)blocks * BlockBytes} {seed}"));
        }
        else
        {
            for (int i = 0; i < blocks; i++)
                Assert.Equal(-1, DataPattern.FindMismatch(pool.SlotAt(blocks - 1 - i).AsSpan(), seed, (long)i * BlockBytes));
        }
    }

    [Fact]
    public async Task Auto_backend_picks_shared_memory_for_a_local_segment_and_tcp_for_private_memory()
    {
        await using var shmPeer = await TransferPeerProcess.StartAsync(2, shm: true);
        await using var tcpPeer = await TransferPeerProcess.StartAsync(2, shm: false);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 1 });
        await using var agent = new TransferAgent();
        agent.Register(pool);
        var local = new[] { MemoryDescriptor.Of(pool.SlotAt(0).Address, BlockBytes) };
        var viaShm = await agent.LoadRemoteAsync(shmPeer.Metadata);
        var viaTcp = await agent.LoadRemoteAsync(tcpPeer.Metadata);
        Assert.True(viaShm.SameHost);
        Assert.Equal(BackendKind.SharedMemory, agent.Prepare(TransferOp.Write, local, viaShm, [shmPeer.Remote(0, BlockBytes)]).Backend);
        Assert.Equal(BackendKind.Tcp, agent.Prepare(TransferOp.Write, local, viaTcp, [tcpPeer.Remote(0, BlockBytes)]).Backend);
        // Forcing TCP onto a shared segment works; forcing shared memory onto private memory is refused up front.
        Assert.Equal(BackendKind.Tcp, agent.Prepare(TransferOp.Write, local, viaShm, [shmPeer.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.Tcp }).Backend);
        var e = Assert.Throws<TransferException>(() => agent.Prepare(TransferOp.Write, local, viaTcp, [tcpPeer.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.SharedMemory }));
        Assert.Contains("not in a shared segment", e.Message);
    }

    [Theory]
    [InlineData(BackendKind.Tcp)]
    [InlineData(BackendKind.SharedMemory)]
    public async Task Notifications_arrive_in_order_and_only_after_their_bytes_are_in_place(BackendKind backend)
    {
        const int blocks = 8;
        await using var peer = await TransferPeerProcess.StartAsync(blocks * 2, shm: backend == BackendKind.SharedMemory);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "sender" });
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        for (int round = 1; round <= 3; round++)
        {
            ulong seed = (ulong)round * 977;
            for (int i = 0; i < blocks; i++)
                DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), seed, (long)i * BlockBytes);
            // The peer checks the whole range the moment it reads the notification.
            var verify = peer.CommandAsync($"NOTIFIED-VERIFY 0 {blocks * BlockBytes} {seed} 30000");
            var message = System.Text.Encoding.UTF8.GetBytes($"batch-{round}");
            var request = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions { Backend = backend, Notification = message });
            var result = await agent.PostAsync(request);
            Assert.True(result.IsSuccess, result.ToString());
            Assert.Equal("OK " + Convert.ToBase64String(message), await verify);
        }
        // Standalone notifications keep their order too.
        for (int k = 0; k < 5; k++)
            Assert.True((await agent.SendNotificationAsync(remote, new[] { (byte)k })).IsSuccess);
        string all = await peer.CommandAsync("NOTIFICATIONS 5 10000");
        Assert.Equal("OK " + string.Join(' ', Enumerable.Range(0, 5).Select(k => "sender:" + Convert.ToBase64String(new[] { (byte)k }))), all);
    }

    [Theory]
    [InlineData(BackendKind.Tcp, ChecksumKind.XxHash3)]
    [InlineData(BackendKind.Tcp, ChecksumKind.Crc32C)]
    [InlineData(BackendKind.SharedMemory, ChecksumKind.XxHash3)]
    public async Task A_corrupted_write_fails_that_descriptor_only_and_sends_no_notification(BackendKind backend, ChecksumKind checksum)
    {
        const int blocks = 6;
        await using var peer = await TransferPeerProcess.StartAsync(blocks * 2, shm: backend == BackendKind.SharedMemory);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        // Corrupt the 3rd payload this agent sends: with one stream, that is descriptor 2.
        await using var agent = new TransferAgent(new TransferAgentOptions { Faults = new TransferFaults { CorruptNthPayload = 3 } });
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        for (int i = 0; i < blocks; i++)
            DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), 5, (long)i * BlockBytes);
        var request = agent.Prepare(TransferOp.Write, local, remote, remoteDescs,
            new TransferOptions { Backend = backend, Checksum = checksum, Streams = 1, Notification = "done"u8.ToArray() });

        var result = await agent.PostAsync(request);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Contains("descriptor 2", result.Error);
        Assert.Contains("checksum mismatch", result.Error);
        for (int i = 0; i < blocks; i++)
            Assert.Equal(i == 2 ? DescriptorStatus.ChecksumMismatch : DescriptorStatus.Done, request.GetStatus(i));
        Assert.StartsWith("TIMEOUT 0", await peer.CommandAsync("NOTIFICATIONS 1 500"));
    }

    [Fact]
    public async Task A_read_corrupted_by_the_sender_is_caught_at_the_destination()
    {
        const int blocks = 4;
        await using var peer = await TransferPeerProcess.StartAsync(blocks * 2, shm: false, ["--corrupt-nth-payload", "2"]);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = new TransferAgent();
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        Assert.Equal("OK", await peer.CommandAsync($"FILL 0 {blocks * BlockBytes} 9"));
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        var request = agent.Prepare(TransferOp.Read, local, remote, remoteDescs, new TransferOptions { Checksum = ChecksumKind.XxHash3, Streams = 1 });

        var result = await agent.PostAsync(request);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Equal(DescriptorStatus.ChecksumMismatch, request.GetStatus(1));
        Assert.Equal(DescriptorStatus.Done, request.GetStatus(0));
        Assert.Equal(DescriptorStatus.Done, request.GetStatus(3));
        // A re-post of the same prepared request (the fault fired once) succeeds.
        Assert.True((await agent.PostAsync(request)).IsSuccess);
    }

    [Theory]
    [InlineData(BackendKind.Tcp)]
    [InlineData(BackendKind.SharedMemory)]
    public async Task A_peer_killed_mid_transfer_fails_the_request_within_its_deadline_and_the_initiator_keeps_working(BackendKind backend)
    {
        const int blocks = 256;
        var deadline = TimeSpan.FromSeconds(20);
        await using var victim = await TransferPeerProcess.StartAsync(blocks * 2, shm: backend == BackendKind.SharedMemory);
        await using var survivor = await TransferPeerProcess.StartAsync(2, shm: false);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = new TransferAgent();
        var regions = agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(victim.Metadata);
        // Rent every slot for the transfer, as a worker would, and give each back once the post has ended.
        var slots = Enumerable.Range(0, blocks).Select(_ => pool.Rent()).ToArray();
        Assert.Equal(blocks, pool.InUse);
        var local = slots.Select(s => MemoryDescriptor.Of(s.Address, BlockBytes)).ToArray();
        var remoteDescs = Enumerable.Range(0, blocks).Select(i => victim.Remote((long)i * BlockBytes, BlockBytes)).ToArray();
        var request = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions { Backend = backend, Deadline = deadline });
        // Warm the connection so the kill lands mid-stream, then kill while 512 MiB are moving.
        Assert.True((await agent.PostAsync(request)).IsSuccess);
        var clock = Stopwatch.StartNew();
        Task<TransferResult> post;
        if (backend == BackendKind.Tcp)
        {
            // Kill once this post has sent 64 MiB of its 512: the rest cannot all be in flight in socket buffers.
            long sentBefore = agent.Stats.TcpBytesSent;
            post = agent.PostAsync(request);
            while (agent.Stats.TcpBytesSent - sentBefore < 64 << 20 && !post.IsCompleted)
                await Task.Delay(1);
            Assert.False(post.IsCompleted, "the transfer finished before the kill: the test lost its race");
            victim.Kill();
        }
        else
        {
            // Shared memory copies without the peer, into a mapping we still hold: the peer must be confirmed alive
            // at the end, so a copy into a dead process's memory is never reported done.
            victim.Kill();
            await victim.WaitForExitAsync();
            post = agent.PostAsync(request);
        }
        var result = await post;
        clock.Stop();

        Assert.NotEqual(TransferStatus.Success, result.Status);
        Assert.True(clock.Elapsed < deadline, $"took {clock.Elapsed}, deadline {deadline}");
        Assert.Contains("'child'", result.Error);
        Assert.Contains(Enumerable.Range(0, blocks), i => request.GetStatus(i) == DescriptorStatus.PeerDisconnected);

        // The initiator keeps working: another peer is reachable, and nothing holds the local regions.
        var other = await agent.LoadRemoteAsync(survivor.Metadata);
        var ok = await agent.PostAsync(agent.Prepare(TransferOp.Write, local[..1], other, [survivor.Remote(0, BlockBytes)]));
        Assert.True(ok.IsSuccess, ok.ToString());
        var again = await agent.PostAsync(request);
        Assert.NotEqual(TransferStatus.Success, again.Status);
        foreach (var slot in slots)
            pool.Return(slot); // throws on a slot returned twice or not from this pool
        Assert.Equal(0, pool.InUse);
        // No transfer still holds the memory: deregistration completes at once instead of waiting it out.
        foreach (var region in regions)
            await agent.DeregisterAsync(region, TimeSpan.FromSeconds(1));
    }

    [Fact]
    public async Task A_frozen_peer_times_out_at_the_deadline()
    {
        await using var peer = await TransferPeerProcess.StartAsync(64, shm: false);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 32 });
        await using var agent = new TransferAgent();
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, 32);
        var request = agent.Prepare(TransferOp.Read, local, remote, remoteDescs, new TransferOptions { Deadline = TimeSpan.FromMilliseconds(800) });
        Assert.True((await agent.PostAsync(request)).IsSuccess);
        peer.Signal("STOP");
        try
        {
            var clock = Stopwatch.StartNew();
            var result = await agent.PostAsync(request);
            Assert.Equal(TransferStatus.TimedOut, result.Status);
            Assert.InRange(clock.Elapsed.TotalMilliseconds, 700, 10_000);
            Assert.Contains("deadline", result.Error);
        }
        finally
        {
            peer.Signal("CONT");
        }
        // The peer is alive again: a fresh post reconnects and succeeds.
        Assert.True((await agent.PostAsync(request)).IsSuccess);
    }

    [Fact]
    public async Task Stale_metadata_after_the_peer_reregistered_is_refused_by_the_target_and_nothing_is_written()
    {
        await using var peer = await TransferPeerProcess.StartAsync(2, shm: false);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 1 });
        await using var agent = new TransferAgent();
        agent.Register(pool);
        var stale = await agent.LoadRemoteAsync(peer.Metadata);
        Assert.StartsWith("READY", await peer.CommandAsync("REREGISTER"));
        Assert.Equal("OK", await peer.CommandAsync($"FILL 0 {BlockBytes} 1"));
        DataPattern.Fill(pool.SlotAt(0).AsSpan(), 2, 0);
        var request = agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(pool.SlotAt(0).Address, BlockBytes)], stale, [peer.Remote(0, BlockBytes)]);

        var result = await agent.PostAsync(request);

        Assert.Equal(DescriptorStatus.Refused, request.GetStatus(0));
        Assert.Contains("no such region", result.Error);
        Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {BlockBytes} 1"));
        Assert.Contains("refused=1", await peer.CommandAsync("STATS"));
        // Reloading the fresh metadata fixes it.
        var fresh = await agent.LoadRemoteAsync(peer.Metadata);
        Assert.True((await agent.PostAsync(agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(pool.SlotAt(0).Address, BlockBytes)], fresh, [peer.Remote(0, BlockBytes)]))).IsSuccess);
        Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {BlockBytes} 2"));
    }
}
