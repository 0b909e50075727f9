using System.Diagnostics;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Ucx;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// The UCX backend against a separate `kvfabric peer --ucx` process, over UCX_TLS=tcp and over shared memory
/// (posix,self). UCX is a prerequisite (scripts/install-prereqs.sh): a missing libucp fails these tests, it does not skip them.
/// </summary>
[Collection("multi-process")]
public sealed class UcxTransferTests
{
    private const int BlockBytes = 1 << 20;
    private const string UcxAlloc = " ucx-alloc";
    public static readonly TheoryData<string> Transports = new() { "tcp", "posix,self" };
    // Plus the peer's region allocated by UCX (TransferAgent.AllocateUcx): posix then maps it instead of emulating puts.
    public static readonly TheoryData<string> Variants = new() { "tcp", "posix,self", "posix,self" + UcxAlloc };

    private static string Tls(string variant) => variant.Replace(UcxAlloc, "", StringComparison.Ordinal);

    private static Dictionary<string, string> Env(string variant) => new() { ["UCX_TLS"] = Tls(variant) };

    private static Task<TransferPeerProcess> StartPeerAsync(string variant, long regionMib, params string[] more) =>
        TransferPeerProcess.StartAsync(regionMib, shm: false,
            [.. variant.EndsWith(UcxAlloc, StringComparison.Ordinal) ? ["--ucx", "--ucx-alloc"] : new[] { "--ucx" }, .. more], environment: Env(variant));

    private static TransferAgent NewAgent(string variant, string name = "ucx-test", TransferFaults? faults = null) => new(new TransferAgentOptions
    {
        Name = name,
        EnableUcx = true,
        UcxSettings = new Dictionary<string, string> { ["TLS"] = Tls(variant) },
        Faults = faults,
    });

    private static void AssertUcx(TransferAgent agent)
    {
        Assert.True(agent.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {agent.UcxUnavailableReason}");
    }

    private static (MemoryDescriptor[] Local, MemoryDescriptor[] Remote) Pair(HostBlockPool pool, TransferPeerProcess peer, int n) =>
        TransferPairs.Reversed(pool, peer, n, BlockBytes);

    [Theory]
    [MemberData(nameof(Variants))]
    public async Task Write_and_read_arrive_byte_for_byte_and_the_transport_is_reported(string tls)
    {
        const int blocks = 24;
        await using var peer = await StartPeerAsync(tls, blocks + 1);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = NewAgent(tls);
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        Assert.False(remote.Metadata.UcxWorkerAddress.IsEmpty);
        var (local, remoteDescs) = Pair(pool, peer, blocks);

        // WRITE: every chunk is done only after the flush, so the peer sees the bytes the moment the post returns.
        for (int i = 0; i < blocks; i++)
            DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), 11, (long)i * BlockBytes);
        var write = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(60) });
        Assert.Equal(BackendKind.Ucx, write.Backend);
        var result = await agent.PostAsync(write);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.All(Enumerable.Range(0, blocks), i => Assert.Equal(DescriptorStatus.Done, write.GetStatus(i)));
        Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {(long)blocks * BlockBytes} 11"));
        Assert.Equal((long)blocks * BlockBytes, agent.Stats.UcxBytesSent);

        // The endpoint's real transport is visible, so a silent fallback cannot hide.
        string expected = tls == "tcp" ? "tcp/" : "posix/";
        Assert.Contains(remote.UcxTransports, t => t.StartsWith(expected, StringComparison.Ordinal));
        Assert.Equal(1, agent.Stats.UcxEndpoints);
        Assert.Equal(tls == "tcp" ? 1 : 0, agent.Stats.UcxTcpEndpoints);

        // READ, re-posted: the second post overwrites with a new pattern.
        var read = agent.Prepare(TransferOp.Read, local, remote, remoteDescs, new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(60) });
        for (ulong seed = 21; seed <= 22; seed++)
        {
            Assert.Equal("OK", await peer.CommandAsync($"FILL 0 {(long)blocks * BlockBytes} {seed}"));
            result = await agent.PostAsync(read);
            Assert.True(result.IsSuccess, result.ToString());
            for (int i = 0; i < blocks; i++)
                Assert.Equal(-1, DataPattern.FindMismatch(pool.SlotAt(blocks - 1 - i).AsSpan(), seed, (long)i * BlockBytes));
        }
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public async Task A_notification_arrives_after_the_flush_with_every_byte_in_place(string tls)
    {
        const int blocks = 16;
        await using var peer = await StartPeerAsync(tls, blocks + 1);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = NewAgent(tls, "sender");
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        for (int round = 1; round <= 3; round++)
        {
            ulong seed = (ulong)round * 31;
            for (int i = 0; i < blocks; i++)
                DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), seed, (long)i * BlockBytes);
            // The peer verifies the whole range the instant it reads the notification.
            var verify = peer.CommandAsync($"NOTIFIED-VERIFY 0 {blocks * BlockBytes} {seed} 30000");
            byte[] message = System.Text.Encoding.UTF8.GetBytes($"ucx-batch-{round}");
            var request = agent.Prepare(TransferOp.Write, local, remote, remoteDescs,
                new TransferOptions { Backend = BackendKind.Ucx, Notification = message, Deadline = TimeSpan.FromSeconds(60) });
            var result = await agent.PostAsync(request);
            Assert.True(result.IsSuccess, result.ToString());
            Assert.Equal("OK " + Convert.ToBase64String(message), await verify);
        }
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public async Task Stale_keys_after_the_peer_reregistered_are_refused_before_any_byte_moves(string tls)
    {
        await using var peer = await StartPeerAsync(tls, 2);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 1 });
        await using var agent = NewAgent(tls);
        AssertUcx(agent);
        agent.Register(pool);
        var stale = await agent.LoadRemoteAsync(peer.Metadata);
        Assert.StartsWith("READY", await peer.CommandAsync("REREGISTER"));
        Assert.Equal("OK", await peer.CommandAsync($"FILL 0 {BlockBytes} 1"));
        DataPattern.Fill(pool.SlotAt(0).AsSpan(), 2, 0);
        var local = new[] { MemoryDescriptor.Of(pool.SlotAt(0).Address, BlockBytes) };
        var request = agent.Prepare(TransferOp.Write, local, stale, [peer.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.Ucx });

        var result = await agent.PostAsync(request);

        Assert.Equal(DescriptorStatus.Refused, request.GetStatus(0));
        Assert.Contains("reload its metadata", result.Error);
        Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {BlockBytes} 1"));
        Assert.Contains("refused=1", await peer.CommandAsync("STATS"));
        Assert.Equal(0, agent.Stats.UcxBytesSent);
        // A region the peer never exported is refused at prepare, and fresh metadata works.
        var ex = Assert.Throws<TransferException>(() => agent.Prepare(TransferOp.Write, local, stale, [peer.Remote(4 * BlockBytes, BlockBytes)], new TransferOptions { Backend = BackendKind.Ucx }));
        Assert.Contains("not inside any region", ex.Message);
        var fresh = await agent.LoadRemoteAsync(peer.Metadata);
        var ok = await agent.PostAsync(agent.Prepare(TransferOp.Write, local, fresh, [peer.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.Ucx }));
        Assert.True(ok.IsSuccess, ok.ToString());
        Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {BlockBytes} 2"));
    }

    [Theory]
    [MemberData(nameof(Transports))]
    public async Task A_killed_peer_fails_the_transfer_clearly_within_the_deadline(string tls)
    {
        const int blocks = 64;
        var deadline = TimeSpan.FromSeconds(20);
        await using var victim = await StartPeerAsync(tls, blocks + 1);
        await using var survivor = await StartPeerAsync(tls, 2);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = NewAgent(tls);
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(victim.Metadata);
        var (local, remoteDescs) = Pair(pool, victim, blocks);
        var request = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions { Backend = BackendKind.Ucx, Deadline = deadline });
        Assert.True((await agent.PostAsync(request)).IsSuccess);
        victim.Kill();
        await victim.WaitForExitAsync();

        var clock = Stopwatch.StartNew();
        var result = await agent.PostAsync(request);
        clock.Stop();

        Assert.NotEqual(TransferStatus.Success, result.Status);
        Assert.True(clock.Elapsed < deadline + TimeSpan.FromSeconds(5), $"took {clock.Elapsed}, deadline {deadline}");
        Assert.Contains("'child'", result.Error);
        Assert.Contains(Enumerable.Range(0, blocks), i => request.GetStatus(i) is DescriptorStatus.PeerDisconnected or DescriptorStatus.TimedOut);

        // The initiator keeps working with another peer.
        var other = await agent.LoadRemoteAsync(survivor.Metadata);
        var ok = await agent.PostAsync(agent.Prepare(TransferOp.Write, local[..1], other, [survivor.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.Ucx }));
        Assert.True(ok.IsSuccess, ok.ToString());
    }

    [Fact]
    public async Task A_peer_killed_mid_read_over_tcp_fails_the_in_flight_chunks_through_the_error_callback()
    {
        const int blocks = 192;
        var deadline = TimeSpan.FromSeconds(30);
        await using var victim = await StartPeerAsync("tcp", blocks + 1);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = NewAgent("tcp");
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(victim.Metadata);
        var (local, remoteDescs) = Pair(pool, victim, blocks);
        var request = agent.Prepare(TransferOp.Read, local, remote, remoteDescs, new TransferOptions { Backend = BackendKind.Ucx, Deadline = deadline });
        Assert.True((await agent.PostAsync(request)).IsSuccess);
        long before = agent.Stats.UcxBytesReceived;
        var clock = Stopwatch.StartNew();
        var post = agent.PostAsync(request);
        while (agent.Stats.UcxBytesReceived - before < 8 * BlockBytes && !post.IsCompleted && clock.Elapsed < deadline)
            await Task.Delay(1);
        Assert.False(post.IsCompleted, "the read finished before the kill: the test lost its race");
        victim.Kill();

        var result = await post;

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.True(clock.Elapsed < deadline, $"took {clock.Elapsed}, deadline {deadline}");
        Assert.Contains("'child'", result.Error);
        Assert.Contains(Enumerable.Range(0, blocks), i => request.GetStatus(i) == DescriptorStatus.PeerDisconnected);
    }

    [Theory]
    [MemberData(nameof(Transports))]
    public async Task A_frozen_peer_times_out_at_the_deadline_and_a_later_post_reconnects(string tls)
    {
        const int blocks = 32;
        await using var peer = await StartPeerAsync(tls, blocks + 1);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = NewAgent(tls);
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        var request = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromMilliseconds(1500) });
        Assert.True((await agent.PostAsync(request)).IsSuccess);
        peer.Signal("STOP");
        try
        {
            var clock = Stopwatch.StartNew();
            var result = await agent.PostAsync(request);
            Assert.Equal(TransferStatus.TimedOut, result.Status);
            Assert.InRange(clock.Elapsed.TotalMilliseconds, 1400, 20_000);
            Assert.Contains("deadline", result.Error);
        }
        finally
        {
            peer.Signal("CONT");
        }
        var again = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(60) });
        for (int i = 0; i < blocks; i++)
            DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), 77, (long)i * BlockBytes);
        var ok = await agent.PostAsync(again);
        Assert.True(ok.IsSuccess, ok.ToString());
        Assert.Equal("OK", await peer.CommandAsync($"VERIFY 0 {(long)blocks * BlockBytes} 77"));
    }

    [Fact]
    public async Task Ucx_requested_where_it_is_not_available_is_refused_with_the_reason()
    {
        await using var plainPeer = await TransferPeerProcess.StartAsync(2, shm: false);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 1 });
        var local = new[] { MemoryDescriptor.Of(pool.SlotAt(0).Address, BlockBytes) };

        await using (var noUcx = new TransferAgent())
        {
            noUcx.Register(pool);
            var r = await noUcx.LoadRemoteAsync(plainPeer.Metadata);
            var e = Assert.Throws<TransferException>(() => noUcx.Prepare(TransferOp.Write, local, r, [plainPeer.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.Ucx }));
            Assert.Contains("EnableUcx", e.Message);
        }
        await using (var ucx = NewAgent("tcp"))
        {
            AssertUcx(ucx);
            ucx.Register(pool);
            var r = await ucx.LoadRemoteAsync(plainPeer.Metadata);
            // The peer runs without UCX: its version-2 metadata still loads, and Auto keeps to TCP.
            Assert.True(r.Metadata.UcxWorkerAddress.IsEmpty);
            var e = Assert.Throws<TransferException>(() => ucx.Prepare(TransferOp.Write, local, r, [plainPeer.Remote(0, BlockBytes)], new TransferOptions { Backend = BackendKind.Ucx }));
            Assert.Contains("does not advertise UCX", e.Message);
            Assert.Equal(BackendKind.Tcp, ucx.Prepare(TransferOp.Write, local, r, [plainPeer.Remote(0, BlockBytes)]).Backend);
        }
        // A UCX that cannot initialise (no such transport) leaves a working agent that says why.
        await using var broken = new TransferAgent(new TransferAgentOptions { EnableUcx = true, UcxSettings = new Dictionary<string, string> { ["TLS"] = "no_such_transport" } });
        broken.Register(pool);
        Assert.False(broken.UcxAvailable);
        Assert.Contains("UCX", broken.UcxUnavailableReason);
        var viaTcp = await broken.LoadRemoteAsync(plainPeer.Metadata);
        Assert.True((await broken.PostAsync(broken.Prepare(TransferOp.Write, local, viaTcp, [plainPeer.Remote(0, BlockBytes)]))).IsSuccess);
    }

    [Fact]
    public async Task Prefer_ucx_picks_ucx_under_auto_for_a_peer_that_advertises_it()
    {
        await using var peer = await StartPeerAsync("tcp", 2);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 1 });
        await using var agent = new TransferAgent(new TransferAgentOptions { EnableUcx = true, PreferUcx = true, UcxSettings = new Dictionary<string, string> { ["TLS"] = "tcp" } });
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var request = agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(pool.SlotAt(0).Address, BlockBytes)], remote, [peer.Remote(0, BlockBytes)]);
        Assert.Equal(BackendKind.Ucx, request.Backend);
        Assert.True((await agent.PostAsync(request)).IsSuccess);
    }

    [Fact]
    public async Task Metadata_version_3_carries_the_worker_address_and_rkeys_and_version_2_still_loads()
    {
        using var mem = new AnonymousMemory(1 << 20);
        await using var agent = NewAgent("tcp");
        AssertUcx(agent);
        agent.Register(mem);
        var md = agent.GetMetadata();
        byte[] bytes = md.ToBytes();
        Assert.Equal(3, BitConverter.ToUInt16(bytes, 4));
        var back = AgentMetadata.Parse(bytes);
        Assert.Equal(md.UcxWorkerAddress.ToArray(), back.UcxWorkerAddress.ToArray());
        Assert.NotEmpty(back.Regions[0].UcxRkey.ToArray());
        Assert.Equal(md.Regions[0].UcxRkey.ToArray(), back.Regions[0].UcxRkey.ToArray());
        // Without UCX the same agent data is written as version 2, which every older reader parses.
        var v2 = (md with { UcxWorkerAddress = ReadOnlyMemory<byte>.Empty }).ToBytes();
        Assert.Equal(2, BitConverter.ToUInt16(v2, 4));
        Assert.True(AgentMetadata.Parse(v2).UcxWorkerAddress.IsEmpty);
        // A truncated UCX section is refused with the reason.
        Assert.Contains("truncated", Assert.Throws<TransferException>(() => AgentMetadata.Parse(bytes.AsSpan(0, bytes.Length - 2))).Message);
    }

    [Fact]
    public async Task Ucx_allocated_memory_is_a_registered_region_with_an_rkey_and_is_freed_with_it()
    {
        await using var agent = NewAgent("posix,self");
        AssertUcx(agent);
        var memory = agent.AllocateUcx(3 << 20);
        Assert.Same(memory.Region, Assert.Single(agent.Regions));
        Assert.Equal((ulong)memory.Address, memory.Region.Address);
        Assert.True(memory.Region.Length >= 3ul << 20);
        Assert.NotEmpty(agent.GetMetadata().Regions[0].UcxRkey.ToArray());
        DataPattern.Fill(memory.GetSpan(0, 3 << 20), 5, 0);
        Assert.Equal(-1, DataPattern.FindMismatch(memory.GetSpan(0, 3 << 20), 5, 0));
        Assert.Throws<ArgumentOutOfRangeException>(() => memory.GetSpan(3 << 20, 1));

        // Deregistering frees it: the object refuses access instead of pointing at unmapped memory.
        await agent.DeregisterAsync(memory.Region);
        Assert.Empty(agent.Regions);
        Assert.Contains("deregistered", Assert.Throws<ObjectDisposedException>(() => memory.Address).Message);

        Assert.Throws<ArgumentOutOfRangeException>(() => agent.AllocateUcx(0));
        await using var noUcx = new TransferAgent();
        Assert.Contains("Register", Assert.Throws<TransferException>(() => noUcx.AllocateUcx(1 << 20)).Message);
    }

    [Fact]
    public async Task A_pool_of_ucx_memory_gives_every_allocation_back_when_it_is_disposed_or_fails_to_build()
    {
        await using var agent = NewAgent("posix,self");
        AssertUcx(agent);
        var options = new HostBlockPoolOptions { SlotBytes = 1 << 20, SlotCount = 6, MaxRegionBytes = 2 << 20, Allocator = agent.AllocateUcx };
        var pool = new HostBlockPool(options);
        Assert.Equal(3, agent.Regions.Count);
        pool.Dispose();
        Assert.Empty(agent.Regions);

        // The third region's allocation fails: the two before it are deregistered (and freed) before the error.
        var handed = new List<UcxMemory>();
        var failing = options with
        {
            Allocator = bytes => handed.Count == 2 ? throw new OutOfMemoryException("injected: no third region") : Keep(agent.AllocateUcx(bytes)),
        };
        UcxMemory Keep(UcxMemory m)
        {
            handed.Add(m);
            return m;
        }
        Assert.Contains("injected", Assert.Throws<OutOfMemoryException>(() => new HostBlockPool(failing)).Message);
        Assert.Equal(2, handed.Count);
        Assert.Empty(agent.Regions);
        Assert.All(handed, m => Assert.Throws<ObjectDisposedException>(() => { _ = m.Address; }));

        // Memory the pool cannot use (too short) is given back too.
        var tooShort = options with { Allocator = bytes => agent.AllocateUcx(bytes / 2) };
        Assert.Contains("Allocator returned", Assert.Throws<ArgumentException>(() => new HostBlockPool(tooShort)).Message);
        Assert.Empty(agent.Regions);
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public async Task Checksummed_writes_are_verified_at_the_target_and_a_corrupted_chunk_fails_alone_without_a_notification(string variant)
    {
        const int blocks = 8;
        await using var peer = await StartPeerAsync(variant, blocks + 1);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        // The sender's 11th checksum is flipped: chunk 2 of the second post, as if its bytes were corrupted in flight.
        await using var agent = NewAgent(variant, "ucx-sum", new TransferFaults { CorruptNthPayload = blocks + 3 });
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        var write = agent.Prepare(TransferOp.Write, local, remote, remoteDescs, new TransferOptions
        {
            Backend = BackendKind.Ucx, Checksum = ChecksumKind.XxHash3, Notification = "sum"u8.ToArray(), Deadline = TimeSpan.FromSeconds(60),
        });

        for (int i = 0; i < blocks; i++)
            DataPattern.Fill(pool.SlotAt(blocks - 1 - i).AsSpan(), 61, (long)i * BlockBytes);
        var verify = peer.CommandAsync($"NOTIFIED-VERIFY 0 {blocks * BlockBytes} 61 30000");
        var result = await agent.PostAsync(write);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal("OK " + Convert.ToBase64String("sum"u8.ToArray()), await verify);
        Assert.Equal((long)blocks * BlockBytes, agent.Stats.UcxBytesSent);

        result = await agent.PostAsync(write);
        Assert.False(result.IsSuccess);
        Assert.Contains("checksum mismatch", result.Error);
        Assert.All(Enumerable.Range(0, blocks), i => Assert.Equal(i == 2 ? DescriptorStatus.ChecksumMismatch : DescriptorStatus.Done, write.GetStatus(i)));
        // Only verified chunks count as sent, and the target never hears of a transfer that did not verify.
        Assert.Equal((long)(2 * blocks - 1) * BlockBytes, agent.Stats.UcxBytesSent);
        Assert.StartsWith("TIMEOUT 0", await peer.CommandAsync("NOTIFICATIONS 1 500"));

        // The next post verifies again.
        Assert.True((await agent.PostAsync(write)).IsSuccess);
    }

    [Theory]
    [MemberData(nameof(Variants))]
    public async Task Checksummed_reads_compare_the_targets_digest_and_a_corrupted_chunk_fails_alone(string variant)
    {
        const int blocks = 6;
        // The peer flips the 4th checksum it sends: chunk 3 of the first read.
        await using var peer = await StartPeerAsync(variant, blocks + 1, "--corrupt-nth-payload", "4");
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = blocks });
        await using var agent = NewAgent(variant);
        AssertUcx(agent);
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata);
        var (local, remoteDescs) = Pair(pool, peer, blocks);
        Assert.Equal("OK", await peer.CommandAsync($"FILL 0 {blocks * BlockBytes} 71"));
        var read = agent.Prepare(TransferOp.Read, local, remote, remoteDescs, new TransferOptions
        {
            Backend = BackendKind.Ucx, Checksum = ChecksumKind.Crc32C, Deadline = TimeSpan.FromSeconds(60),
        });
        var result = await agent.PostAsync(read);
        Assert.False(result.IsSuccess);
        Assert.All(Enumerable.Range(0, blocks), i => Assert.Equal(i == 3 ? DescriptorStatus.ChecksumMismatch : DescriptorStatus.Done, read.GetStatus(i)));
        Assert.Equal((long)(blocks - 1) * BlockBytes, agent.Stats.UcxBytesReceived);

        result = await agent.PostAsync(read);
        Assert.True(result.IsSuccess, result.ToString());
        for (int i = 0; i < blocks; i++)
            Assert.Equal(-1, DataPattern.FindMismatch(pool.SlotAt(blocks - 1 - i).AsSpan(), 71, (long)i * BlockBytes));
    }
}
