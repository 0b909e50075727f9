using System.Net;
using System.Net.Sockets;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>Defects found in review, each pinned so it stays fixed.</summary>
public sealed class ReviewRegressionTests
{
    private const int Block = 64 * 1024;

    [Fact]
    public async Task A_target_that_acknowledges_a_chunk_it_was_never_sent_fails_the_request_not_the_process()
    {
        // A fake target: it answers the handshake, then acknowledges chunk 0x7ffffff0 of whatever arrives.
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        await using var real = new TransferAgent(new TransferAgentOptions { Name = "fake" });
        using var targetMemory = new AnonymousMemory(Block);
        real.Register(targetMemory);
        var md = real.GetMetadata() with { TcpPort = ((IPEndPoint)listener.LocalEndpoint).Port };
        var fake = Task.Run(async () =>
        {
            using var client = await listener.AcceptTcpClientAsync();
            var stream = client.GetStream();
            var header = new byte[FrameHeader.Size];
            await stream.ReadExactlyAsync(header);
            await stream.ReadExactlyAsync(new byte[FrameHeader.Read(header).Length]);
            new FrameHeader { Type = FrameType.HelloOk }.Write(header);
            await stream.WriteAsync(header);
            await stream.ReadExactlyAsync(header);
            var write = FrameHeader.Read(header);
            new FrameHeader { Type = FrameType.WriteAck, RequestId = write.RequestId, Chunk = 0x7ffffff0 }.Write(header);
            await stream.WriteAsync(header);
            await Task.Delay(2000);
        });

        await using var agent = new TransferAgent();
        using var local = new AnonymousMemory(Block);
        agent.Register(local);
        var remote = await agent.LoadRemoteAsync(md.ToBytes());
        var result = await agent.PostAsync(agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Block)], remote,
            [MemoryDescriptor.Of(targetMemory.Address, Block)], new TransferOptions { Backend = BackendKind.Tcp, Deadline = TimeSpan.FromSeconds(10) }));

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Contains("chunk 2147483632", result.Error);
        await fake;
    }

    // A peer advertised by name is resolved before the connect (under the request's deadline), not inside a blocking
    // Connect(host, port) that no deadline can stop.
    [Fact]
    public async Task A_peer_advertised_by_host_name_is_resolved_and_reached()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "named", AdvertiseHost = "localhost" });
        using var dst = new AnonymousMemory(Block);
        target.Register(dst);
        await using var agent = new TransferAgent();
        using var local = new AnonymousMemory(Block);
        agent.Register(local);
        local.GetSpan(0, Block).Fill(0x5A);
        var remote = await agent.LoadRemoteAsync(target.ExportMetadata());
        Assert.Equal("localhost", remote.Metadata.TcpHost);
        var result = await agent.PostAsync(agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Block)], remote,
            [MemoryDescriptor.Of(dst.Address, Block)], new TransferOptions { Backend = BackendKind.Tcp, Deadline = TimeSpan.FromSeconds(30) }));
        Assert.True(result.IsSuccess, result.ToString());
        Assert.True(dst.GetSpan(0, Block).SequenceEqual(local.GetSpan(0, Block)));
    }

    [Fact]
    public async Task A_post_after_its_remote_was_unloaded_fails_clearly_and_maps_nothing()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target" });
        using var segment = SharedMemorySegment.Create(Block, "unload");
        target.Register(segment);
        await using var agent = new TransferAgent();
        using var local = new AnonymousMemory(Block);
        agent.Register(local);
        var remote = await agent.LoadRemoteAsync(target.ExportMetadata());
        var request = agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Block)], remote, [MemoryDescriptor.Of(segment.Address, Block)]);
        Assert.True((await agent.PostAsync(request)).IsSuccess);
        await agent.UnloadRemoteAsync(remote);

        var result = await agent.PostAsync(request);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Contains("unloaded", result.Error);
        Assert.False(request.IsPosted);
    }

    [Fact]
    public async Task A_repost_after_the_region_shrank_is_refused_instead_of_writing_past_it()
    {
        await using var target = new TransferAgent();
        using var dst = new AnonymousMemory(8 << 20);
        var dstRegion = target.Register(dst);
        await using var agent = new TransferAgent();
        using var src = new AnonymousMemory(8 << 20);
        var whole = agent.Register(src);
        var remote = await agent.LoadRemoteAsync(target.ExportMetadata());
        var request = agent.Prepare(TransferOp.Read, [MemoryDescriptor.Of(src.Address, 8 << 20)], remote, [dstRegion.Descriptor()],
            new TransferOptions { Backend = BackendKind.Tcp });
        await agent.DeregisterAsync(whole);
        agent.Register(src.Address, 6 << 20); // same start, shorter: the chunks past 6 MiB are no longer registered
        src.GetSpan(7 << 20, 1)[0] = 0x11;

        var result = await agent.PostAsync(request);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Contains("deregistered", result.Error);
        Assert.Equal(0x11, src.GetSpan(7 << 20, 1)[0]);
    }

    [Fact]
    public async Task A_peers_file_regions_are_not_mapped_unless_their_directory_is_allowed()
    {
        string dir = Directory.CreateTempSubdirectory("kvfabric-files-").FullName;
        try
        {
            using var file = MappedMemory.Create(Path.Combine(dir, "blocks.bin"), Block, MemoryKind.File, unlinkOnDispose: true);
            await using var target = new TransferAgent();
            var region = target.Register(file);
            using var local = new AnonymousMemory(Block);
            DataPattern.Fill(local.GetSpan(0, Block), 4, 0);

            await using var strict = new TransferAgent();
            strict.Register(local);
            var viaStrict = await strict.LoadRemoteAsync(target.ExportMetadata());
            var tcp = strict.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Block)], viaStrict, [region.Descriptor()]);
            Assert.Equal(BackendKind.Tcp, tcp.Backend);
            Assert.True((await strict.PostAsync(tcp)).IsSuccess);
            Assert.Equal(-1, DataPattern.FindMismatch(file.GetSpan(0, Block), 4, 0));

            await using var allowed = new TransferAgent(new TransferAgentOptions { SharedFileDirectory = dir });
            allowed.Register(local);
            var viaAllowed = await allowed.LoadRemoteAsync(target.ExportMetadata());
            Assert.Equal(BackendKind.SharedMemory, allowed.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Block)], viaAllowed, [region.Descriptor()]).Backend);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    // A directory link planted inside the allowed directory would lead a peer's file region outside it: such a region is
    // reached over TCP only, never mapped.
    [Fact]
    public async Task A_file_region_behind_a_directory_link_inside_the_allowed_directory_is_not_mapped()
    {
        string allowedDir = Directory.CreateTempSubdirectory("kvfabric-files-").FullName;
        string elsewhere = Directory.CreateTempSubdirectory("kvfabric-elsewhere-").FullName;
        try
        {
            using var file = MappedMemory.Create(Path.Combine(elsewhere, "blocks.bin"), Block, MemoryKind.File, unlinkOnDispose: true);
            Directory.CreateSymbolicLink(Path.Combine(allowedDir, "link"), elsewhere);
            await using var target = new TransferAgent();
            var region = target.Register(file);
            var md = target.GetMetadata();
            // The peer names its file through the link, inside the allowed directory by the path's text.
            var named = md with { Regions = md.Regions.Select(r => r.MappedPath is null ? r : r with { MappedPath = Path.Combine(allowedDir, "link", "blocks.bin") }).ToList() };
            using var local = new AnonymousMemory(Block);
            await using var allowed = new TransferAgent(new TransferAgentOptions { SharedFileDirectory = allowedDir });
            allowed.Register(local);
            var remote = await allowed.LoadRemoteAsync(named.ToBytes());
            Assert.Equal(BackendKind.Tcp, allowed.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Block)], remote, [region.Descriptor()]).Backend);
        }
        finally
        {
            Directory.Delete(allowedDir, recursive: true);
            Directory.Delete(elsewhere, recursive: true);
        }
    }
}
