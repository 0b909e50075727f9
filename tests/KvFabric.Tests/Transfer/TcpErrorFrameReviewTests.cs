using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>An ERROR frame from the target ends the connection like any other break: posts fail promptly and clearly.</summary>
public sealed class TcpErrorFrameReviewTests
{
    private const int Chunk = 4096;
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task Stale_metadata_of_a_restarted_peer_fails_the_post_instead_of_hanging_it()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target" });
        using var memory = new AnonymousMemory(16 * Chunk);
        target.Register(memory);
        // What an initiator holds after the peer restarted on the same endpoint: another agent id.
        var stale = target.GetMetadata() with { AgentId = Guid.NewGuid() };
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "initiator" });
        using var local = new AnonymousMemory(16 * Chunk);
        agent.Register(local);
        var remote = await agent.LoadRemoteAsync(stale.ToBytes());
        var request = agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, Chunk)], remote, [MemoryDescriptor.Of(memory.Address, Chunk)],
            new TransferOptions { Backend = BackendKind.Tcp, Deadline = TimeSpan.FromSeconds(5) });

        var result = await agent.PostAsync(request).WaitAsync(Bound);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Contains("reload", result.Error);
        // And the next post is refused the same way, not stuck behind the first connect.
        Assert.Equal(TransferStatus.Failed, (await agent.PostAsync(request).WaitAsync(Bound)).Status);
    }

    [Fact]
    public async Task An_error_frame_after_the_handshake_fails_what_waits_on_that_connection()
    {
        await using var fake = new FakeTcpTarget();
        var (agent, local, remote, _, owner, target) = await TcpStripeReviewTests.SetUpAsync(fake);
        await using var _a = agent;
        await using var _o = owner;
        using var _l = local;
        using var _t = target;
        var request = agent.Prepare(TransferOp.Read, [MemoryDescriptor.Of(local.Address, Chunk)], remote, [MemoryDescriptor.Of(target.Address, Chunk)],
            new TransferOptions { Backend = BackendKind.Tcp, Streams = 1, Deadline = TimeSpan.FromSeconds(5) });

        var post = agent.PostAsync(request);
        var conn = await fake.AcceptAsync();
        await FakeTcpTarget.ReadAsync(conn);
        byte[] text = "the target failed on this connection: test"u8.ToArray();
        await FakeTcpTarget.SendAsync(conn, new FrameHeader { Type = FrameType.Error, Length = (uint)text.Length }, text);
        var result = await post.WaitAsync(Bound);

        Assert.Equal(TransferStatus.Failed, result.Status);
        Assert.Equal(DescriptorStatus.PeerDisconnected, request.GetStatus(0));
        Assert.Contains("the target failed on this connection", result.Error);
    }
}
