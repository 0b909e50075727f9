using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>Misuse is refused before a byte moves, with a message that says what was wrong; the target keeps serving.</summary>
public sealed class TransferValidationTests : IAsyncLifetime
{
    private const int Block = 64 * 1024;
    private readonly HostBlockPool _localPool = new(new HostBlockPoolOptions { SlotBytes = Block, SlotCount = 8 });
    private readonly HostBlockPool _targetPool = new(new HostBlockPoolOptions { SlotBytes = Block, SlotCount = 8 });
    private TransferAgent _initiator = null!;
    private TransferAgent _target = null!;
    private RemoteAgent _remote = null!;
    private RegisteredRegion _targetRegion = null!;

    public async Task InitializeAsync()
    {
        _initiator = new TransferAgent(new TransferAgentOptions { Name = "initiator" });
        _target = new TransferAgent(new TransferAgentOptions { Name = "target" });
        _initiator.Register(_localPool);
        _targetRegion = _target.Register(_targetPool)[0];
        _remote = await _initiator.LoadRemoteAsync(_target.ExportMetadata());
        for (int i = 0; i < 8; i++)
        {
            DataPattern.Fill(_localPool.SlotAt(i).AsSpan(), 1, i * Block);
            DataPattern.Fill(_targetPool.SlotAt(i).AsSpan(), 2, i * Block);
        }
    }

    public async Task DisposeAsync()
    {
        await _initiator.DisposeAsync();
        await _target.DisposeAsync();
        _localPool.Dispose();
        _targetPool.Dispose();
    }

    private MemoryDescriptor L(int slot, int length = Block, int offset = 0) => MemoryDescriptor.Of(_localPool.SlotAt(slot).Address + offset, length);
    private MemoryDescriptor R(int slot, int length = Block, int offset = 0) => MemoryDescriptor.Of(_targetPool.SlotAt(slot).Address + offset, length);

    private void AssertTargetUntouched()
    {
        for (int i = 0; i < 8; i++)
            Assert.Equal(-1, DataPattern.FindMismatch(_targetPool.SlotAt(i).AsSpan(), 2, i * Block));
    }

    private TransferException Refused(MemoryDescriptor[] local, MemoryDescriptor[] remote, TransferOp op = TransferOp.Write)
    {
        var e = Assert.Throws<TransferException>(() => _initiator.Prepare(op, local, _remote, remote));
        AssertTargetUntouched();
        return e;
    }

    [Fact]
    public void A_local_descriptor_outside_registered_memory_is_refused()
    {
        using var unregistered = new AnonymousMemory(Block);
        var e = Refused([MemoryDescriptor.Of(unregistered.Address, Block)], [R(0)]);
        Assert.Contains("local descriptor 0", e.Message);
        Assert.Contains("not inside any region registered", e.Message);
        // Straddling the end of a registered region is refused too.
        var tail = MemoryDescriptor.Of(_localPool.Regions[0].Address + (nint)_localPool.Regions[0].Length - 16, 32);
        Assert.Contains("not inside any region registered", Refused([tail], [R(0, 32)]).Message);
    }

    [Fact]
    public void A_remote_descriptor_we_hold_no_key_for_is_refused()
    {
        var e = Refused([L(0)], [new MemoryDescriptor(_targetRegion.Address + _targetRegion.Length, Block)]);
        Assert.Contains("remote descriptor 0", e.Message);
        Assert.Contains("no key", e.Message);
    }

    [Fact]
    public async Task Regions_left_out_of_exported_metadata_cannot_be_reached()
    {
        using var secret = new AnonymousMemory(Block);
        var hidden = _target.Register(secret);
        using var shared = new AnonymousMemory(Block);
        var exported = _target.Register(shared);
        var partial = await _initiator.LoadRemoteAsync(_target.ExportMetadata([exported]));
        Assert.Throws<TransferException>(() => _initiator.Prepare(TransferOp.Write, [L(0)], partial, [hidden.Descriptor()]));
        Assert.True((await _initiator.PostAsync(_initiator.Prepare(TransferOp.Write, [L(0)], partial, [exported.Descriptor()]))).IsSuccess);
    }

    [Fact]
    public void Zero_length_mismatched_and_empty_descriptor_lists_are_refused()
    {
        Assert.Contains("zero length", Refused([L(0, 0)], [R(0, 0)]).Message);
        Assert.Contains("differ in length", Refused([L(0)], [R(0, Block / 2)]).Message);
        Assert.Contains("pair up", Refused([L(0), L(1)], [R(0)]).Message);
        Assert.Contains("at least one", Refused([], []).Message);
    }

    [Fact]
    public void Overlapping_destinations_are_refused_for_writes_and_reads()
    {
        var e = Refused([L(0), L(1)], [R(0), R(0, Block, Block / 2)]);
        Assert.Contains("overlap", e.Message);
        Assert.Contains("remote", e.Message);
        var r = Refused([L(2), L(2, Block / 2, 100)], [R(0), R(1, Block / 2)], TransferOp.Read);
        Assert.Contains("local destination", r.Message);
        // Overlapping sources are harmless and allowed.
        _initiator.Prepare(TransferOp.Write, [L(0), L(0)], _remote, [R(0), R(1)]);
    }

    [Fact]
    public async Task A_forged_key_is_refused_by_the_target_and_nothing_is_written()
    {
        var md = _target.GetMetadata();
        var forged = md with
        {
            Regions = md.Regions.Select(r => r with { Key = new RegionKey(r.Key.Value ^ 1) }).ToArray(),
        };
        var remote = await _initiator.LoadRemoteAsync(forged.ToBytes());
        var request = _initiator.Prepare(TransferOp.Write, [L(0), L(1)], remote, [R(3), R(4)], new TransferOptions { Backend = BackendKind.Tcp });

        var result = await _initiator.PostAsync(request);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Equal(DescriptorStatus.Refused, request.GetStatus(0));
        Assert.Equal(DescriptorStatus.Refused, request.GetStatus(1));
        Assert.Contains("key does not match", result.Error);
        Assert.Equal(2, _target.Stats.RefusedFrames);
        AssertTargetUntouched();
        // The same connection keeps serving valid requests.
        remote = await _initiator.LoadRemoteAsync(md.ToBytes());
        Assert.True((await _initiator.PostAsync(_initiator.Prepare(TransferOp.Write, [L(0)], remote, [R(3)], new TransferOptions { Backend = BackendKind.Tcp }))).IsSuccess);
        Assert.Equal(-1, DataPattern.FindMismatch(_targetPool.SlotAt(3).AsSpan(), 1, 0));
    }

    [Fact]
    public async Task A_prepared_request_is_reposted_without_revalidation()
    {
        var request = _initiator.Prepare(TransferOp.Read, [L(5)], _remote, [R(6)], new TransferOptions { Backend = BackendKind.Tcp });
        for (int round = 0; round < 3; round++)
        {
            DataPattern.Fill(_targetPool.SlotAt(6).AsSpan(), (ulong)(10 + round), 0);
            Assert.True((await _initiator.PostAsync(request)).IsSuccess);
            Assert.Equal(-1, DataPattern.FindMismatch(_localPool.SlotAt(5).AsSpan(), (ulong)(10 + round), 0));
        }
    }

    [Fact]
    public async Task A_request_cannot_be_posted_again_while_its_post_is_in_flight()
    {
        // A target that accepts the connection but never answers the handshake holds the first post until its deadline.
        using var silent = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        silent.Start();
        var md = _target.GetMetadata() with { TcpPort = ((System.Net.IPEndPoint)silent.LocalEndpoint).Port };
        var remote = await _initiator.LoadRemoteAsync(md.ToBytes());
        var request = _initiator.Prepare(TransferOp.Write, [L(0)], remote, [R(0)],
            new TransferOptions { Backend = BackendKind.Tcp, Deadline = TimeSpan.FromSeconds(2) });

        var first = _initiator.PostAsync(request);

        Assert.True(request.IsPosted);
        Assert.Contains("already posted", (await Assert.ThrowsAsync<InvalidOperationException>(() => _initiator.PostAsync(request))).Message);
        Assert.NotEqual(TransferStatus.Success, (await first).Status);
        Assert.False(request.IsPosted);
        AssertTargetUntouched();
    }

    /// <summary>One large region on each side, registered, and a single-descriptor WRITE between them.</summary>
    private async Task<TransferRequest> LargeWriteAsync(AnonymousMemory big, AnonymousMemory bigTarget, TransferOptions options)
    {
        _initiator.Register(big);
        var region = _target.Register(bigTarget);
        var remote = await _initiator.LoadRemoteAsync(_target.ExportMetadata());
        return _initiator.Prepare(TransferOp.Write, [MemoryDescriptor.Of(big.Address, big.Length)], remote, [region.Descriptor()], options);
    }

    [Fact]
    public async Task Large_descriptors_are_split_into_chunks_and_striped_over_streams()
    {
        using var big = new AnonymousMemory(20 << 20);
        using var bigTarget = new AnonymousMemory(20 << 20);
        DataPattern.Fill(big.GetSpan(0, 20 << 20), 77, 0);
        var request = await LargeWriteAsync(big, bigTarget, new TransferOptions { Backend = BackendKind.Tcp, Streams = 4, Checksum = ChecksumKind.Crc32C });
        Assert.True((await _initiator.PostAsync(request)).IsSuccess);
        Assert.Equal(-1, DataPattern.FindMismatch(bigTarget.GetSpan(0, 20 << 20), 77, 0));
        Assert.Equal(20L << 20, _target.Stats.TcpBytesReceived);
    }

    [Fact]
    public async Task Agents_with_different_chunk_limits_interoperate_at_the_smaller_one()
    {
        await using var bigChunks = new TransferAgent(new TransferAgentOptions { Name = "big-chunks", MaxChunkBytes = 16 << 20 });
        using var src = new AnonymousMemory(16 << 20);
        using var dst = new AnonymousMemory(16 << 20);
        bigChunks.Register(src);
        var region = _target.Register(dst); // the target keeps the default 4 MiB limit
        var remote = await bigChunks.LoadRemoteAsync(_target.ExportMetadata());
        Assert.Equal(4 << 20, remote.Metadata.MaxChunkBytes);
        DataPattern.Fill(src.GetSpan(0, 16 << 20), 31, 0);
        var request = bigChunks.Prepare(TransferOp.Write, [MemoryDescriptor.Of(src.Address, 16 << 20)], remote, [region.Descriptor()],
            new TransferOptions { Backend = BackendKind.Tcp });
        var result = await bigChunks.PostAsync(request);
        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(-1, DataPattern.FindMismatch(dst.GetSpan(0, 16 << 20), 31, 0));
        Assert.Equal(0, _target.Stats.MalformedFrames);
    }

    [Fact]
    public async Task Deregistered_local_memory_fails_a_later_post_with_a_clear_error()
    {
        using var scratch = new AnonymousMemory(Block);
        var region = _initiator.Register(scratch);
        var request = _initiator.Prepare(TransferOp.Write, [MemoryDescriptor.Of(scratch.Address, Block)], _remote, [R(0)]);
        await _initiator.DeregisterAsync(region);
        var result = await _initiator.PostAsync(request);
        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Contains("deregistered", result.Error);
        AssertTargetUntouched();
    }

    [Fact]
    public async Task Cancellation_stops_a_post_and_reports_it()
    {
        using var big = new AnonymousMemory(64 << 20);
        using var bigTarget = new AnonymousMemory(64 << 20);
        var request = await LargeWriteAsync(big, bigTarget, new TransferOptions { Backend = BackendKind.Tcp, Streams = 1 });
        using var cts = new CancellationTokenSource();
        await cts.CancelAsync();
        var result = await _initiator.PostAsync(request, cts.Token);
        Assert.Equal(TransferStatus.Cancelled, result.Status);
        Assert.Equal(DescriptorStatus.Cancelled, request.GetStatus(0));
        // The agent recovers: the next post reconnects and succeeds.
        Assert.True((await _initiator.PostAsync(request)).IsSuccess);
    }

    [Fact]
    public async Task A_layout_mismatch_fails_loudly_when_loading_the_peer()
    {
        await using var a = new TransferAgent(new TransferAgentOptions { LayoutFingerprint = new byte[] { 1, 2, 3 } });
        await using var b = new TransferAgent(new TransferAgentOptions { LayoutFingerprint = new byte[] { 1, 2, 4 } });
        var e = await Assert.ThrowsAsync<TransferException>(() => a.LoadRemoteAsync(b.ExportMetadata()));
        Assert.Contains("same model layout", e.Message);
    }

    [Fact]
    public async Task A_notification_queue_that_is_not_drained_refuses_with_a_clear_status()
    {
        await using var slow = new TransferAgent(new TransferAgentOptions { Name = "slow", NotificationQueueCapacity = 2 });
        var remote = await _initiator.LoadRemoteAsync(slow.ExportMetadata());
        Assert.True((await _initiator.SendNotificationAsync(remote, "1"u8.ToArray())).IsSuccess);
        Assert.True((await _initiator.SendNotificationAsync(remote, "2"u8.ToArray())).IsSuccess);
        var full = await _initiator.SendNotificationAsync(remote, "3"u8.ToArray());
        Assert.Equal(TransferStatus.Failed, full.Status);
        Assert.Contains("notification queue is full", full.Error);
        Assert.True(slow.Notifications.TryRead(out var n));
        Assert.Equal("1"u8.ToArray(), n.Message);
        Assert.Equal("initiator", n.FromAgent);
    }

    [Fact]
    public async Task A_malformed_frame_closes_that_connection_is_counted_and_the_target_keeps_serving()
    {
        using (var raw = new System.Net.Sockets.TcpClient())
        {
            await raw.ConnectAsync(_target.TcpEndpoint);
            var stream = raw.GetStream();
            await stream.WriteAsync(new byte[64]); // zero magic
            var buffer = new byte[4096];
            int total = 0, n;
            while ((n = await stream.ReadAsync(buffer.AsMemory(total))) > 0)
                total += n;
            Assert.Contains("bad frame magic", System.Text.Encoding.UTF8.GetString(buffer, 64, total - 64));
        }
        Assert.Equal(1, _target.Stats.MalformedFrames);
        Assert.True((await _initiator.PostAsync(_initiator.Prepare(TransferOp.Write, [L(0)], _remote, [R(0)], new TransferOptions { Backend = BackendKind.Tcp }))).IsSuccess);
    }
}
