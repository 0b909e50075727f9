using System.Net;
using System.Net.Sockets;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// A connection carries the chunks i with i % streams == its index, and only those: its failure must not settle chunks
/// another connection is moving, and a reply on it for another connection's chunk must not land in local memory.
/// </summary>
public sealed class TcpStripeReviewTests
{
    private const int Chunk = 4096;
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    internal static async Task<(TransferAgent Agent, AnonymousMemory Local, RemoteAgent Remote, AgentMetadata Md, TransferAgent Owner, AnonymousMemory TargetMemory)> SetUpAsync(FakeTcpTarget fake)
    {
        // A real agent only to make valid metadata (region ids, keys); the fake answers at its address.
        var owner = new TransferAgent(new TransferAgentOptions { Name = "fake" });
        var targetMemory = new AnonymousMemory(16 * Chunk);
        owner.Register(targetMemory);
        var md = owner.GetMetadata() with { TcpPort = fake.Port, MaxChunkBytes = Chunk };
        var agent = new TransferAgent(new TransferAgentOptions { Name = "initiator", ConnectTimeout = TimeSpan.FromSeconds(30) });
        var local = new AnonymousMemory(16 * Chunk);
        agent.Register(local);
        var remote = await agent.LoadRemoteAsync(md.ToBytes());
        return (agent, local, remote, md, owner, targetMemory);
    }

    private static TransferRequest Read(TransferAgent agent, AnonymousMemory local, int localOffset, RemoteAgent remote, AnonymousMemory target, int chunks, int streams) =>
        agent.Prepare(TransferOp.Read, [MemoryDescriptor.Of(local.Address + localOffset, chunks * Chunk)], remote,
            [MemoryDescriptor.Of(target.Address + localOffset, chunks * Chunk)],
            new TransferOptions { Backend = BackendKind.Tcp, Streams = streams, Deadline = Bound });

    [Fact]
    public async Task A_connection_that_breaks_does_not_fail_chunks_of_a_request_striped_over_fewer_connections()
    {
        await using var fake = new FakeTcpTarget();
        var (agent, local, remote, _, owner, target) = await SetUpAsync(fake);
        await using var _a = agent;
        await using var _o = owner;
        using var _l = local;
        using var _t = target;

        // B: one stream, four chunks, all on connection 0; the fake holds its replies back.
        var b = Read(agent, local, 0, remote, target, chunks: 4, streams: 1);
        var bPost = agent.PostAsync(b);
        var conn0 = await fake.AcceptAsync();
        var asked = new FrameHeader[4];
        for (int i = 0; i < 4; i++)
            asked[i] = await FakeTcpTarget.ReadAsync(conn0);

        // A: two streams; its connection 1 is dropped during the handshake (a target at its connection limit does this).
        var a = Read(agent, local, 8 * Chunk, remote, target, chunks: 2, streams: 2);
        var aPost = agent.PostAsync(a);
        (await fake.AcceptAsync(answerHello: false)).Socket.Dispose();
        Assert.Equal(TransferStatus.Failed, (await aPost.WaitAsync(Bound)).Status);

        // B's chunks were never on connection 1: they arrive now on connection 0 and B succeeds.
        foreach (var h in asked)
            await FakeTcpTarget.ReadDataAsync(conn0, h, (byte)(0x40 + h.Chunk));
        var result = await bPost.WaitAsync(Bound);

        Assert.True(result.IsSuccess, result.ToString());
        for (int i = 0; i < 4; i++)
            Assert.Equal((byte)(0x40 + i), local.GetSpan((long)i * Chunk, Chunk)[Chunk - 1]);
    }

    [Fact]
    public async Task A_reply_on_a_connection_that_does_not_carry_that_chunk_is_not_written()
    {
        await using var fake = new FakeTcpTarget();
        var (agent, local, remote, _, owner, target) = await SetUpAsync(fake);
        await using var _a = agent;
        await using var _o = owner;
        using var _l = local;
        using var _t = target;

        // Open connections 0 and 1 with a two-stream READ the fake answers properly.
        var warm = agent.PostAsync(Read(agent, local, 8 * Chunk, remote, target, chunks: 2, streams: 2));
        var conn0 = await fake.AcceptAsync();
        var conn1 = await fake.AcceptAsync();
        await FakeTcpTarget.ReadDataAsync(conn0, await FakeTcpTarget.ReadAsync(conn0), 1);
        await FakeTcpTarget.ReadDataAsync(conn1, await FakeTcpTarget.ReadAsync(conn1), 1);
        Assert.True((await warm.WaitAsync(Bound)).IsSuccess);

        // B: one stream, so its only chunk is on connection 0 (the one its deadline or cancellation would close).
        var b = Read(agent, local, 0, remote, target, chunks: 1, streams: 1);
        var bPost = agent.PostAsync(b);
        var asked = await FakeTcpTarget.ReadAsync(conn0);

        // The target answers it on connection 1 first, then properly on connection 0.
        await FakeTcpTarget.ReadDataAsync(conn1, asked, 0xEE);
        // Either the initiator drops connection 1 for breaking the protocol, or it took the reply and B is over.
        var conn1Closed = conn1.ReadAsync(new byte[1]).AsTask();
        await Task.WhenAny(conn1Closed, bPost).WaitAsync(Bound);
        await FakeTcpTarget.ReadDataAsync(conn0, asked, 0x11);
        var result = await bPost.WaitAsync(Bound);

        Assert.True(result.IsSuccess, result.ToString());
        Assert.Equal(0x11, local.GetSpan(0, Chunk)[0]);
        Assert.Equal(0x11, local.GetSpan(0, Chunk)[Chunk - 1]);
    }
}
