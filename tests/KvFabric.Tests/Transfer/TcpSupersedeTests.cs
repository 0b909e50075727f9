using System.Net.Sockets;
using System.Text;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// A WRITE that timed out on the initiator must not land at the target after a later WRITE from the same initiator: the
/// target's session for the abandoned connection may still hold its bytes in the kernel's socket buffer.
/// </summary>
public sealed class TcpSupersedeTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task A_timed_out_write_does_not_land_over_a_later_one_from_the_same_initiator()
    {
        const int length = 64 * 1024;
        using var entered = new SemaphoreSlim(0);
        using var release = new ManualResetEventSlim();
        int writes = 0;
        // The target's session for the first WRITE freezes after reading its header, before receiving its payload:
        // what a busy or descheduled target thread does while the initiator's deadline passes.
        var faults = new TransferFaults
        {
            BeforeWriteLands = () =>
            {
                if (Interlocked.Increment(ref writes) == 1)
                {
                    entered.Release();
                    release.Wait(Bound);
                }
            },
        };
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", Faults = faults, ConnectTimeout = TimeSpan.FromSeconds(30) });
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "initiator", ConnectTimeout = TimeSpan.FromSeconds(30) });
        using var destination = new AnonymousMemory(length);
        using var source = new AnonymousMemory(length);
        var region = target.Register(destination);
        initiator.Register(source);
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        MemoryDescriptor[] local = [MemoryDescriptor.Of(source.Address, length)];
        MemoryDescriptor[] far = [MemoryDescriptor.Of(destination.Address, length)];

        source.GetSpan(0, length).Fill(0xAA);
        var a = initiator.Prepare(TransferOp.Write, local, remote, far, new TransferOptions { Backend = BackendKind.Tcp, Deadline = TimeSpan.FromSeconds(2) });
        Assert.Equal(TransferStatus.TimedOut, (await initiator.PostAsync(a)).Status);
        Assert.True(await entered.WaitAsync(Bound), "the target never started the first WRITE");

        // The retry (a new request: the old one's bytes may still sit in the target's socket buffer) writes B.
        source.GetSpan(0, length).Fill(0xBB);
        var b = initiator.Prepare(TransferOp.Write, local, remote, far, new TransferOptions { Backend = BackendKind.Tcp, Deadline = TimeSpan.FromSeconds(50) });
        var postB = initiator.PostAsync(b);
        // Without the fix B completes at once; with it, B's connection waits for the old session to stop. Either way the
        // old session is let go after B completed or 3 s passed, whichever first.
        await Task.WhenAny(postB, Task.Delay(TimeSpan.FromSeconds(3)));
        release.Set();
        Assert.Equal(TransferStatus.Success, (await postB.WaitAsync(Bound)).Status);

        // Wait until no session holds the region (the old one landed A or gave up), then look.
        await target.DeregisterAsync(region, Bound);
        Assert.True(destination.GetSpan(0, length).IndexOfAnyExcept((byte)0xBB) < 0, "bytes of the timed-out WRITE landed over the later one");
    }

    private static async Task<(TcpClient Client, NetworkStream Stream)> HelloAsync(TransferAgent target, Guid initiator, ulong set, int stream, uint abandoned, bool flagged = true)
    {
        var client = new TcpClient();
        await client.ConnectAsync(target.TcpEndpoint).WaitAsync(Bound);
        var s = client.GetStream();
        byte[] name = Encoding.UTF8.GetBytes("raw");
        byte[] hello = new byte[32 + name.Length];
        target.AgentId.TryWriteBytes(hello.AsSpan(0, 16));
        initiator.TryWriteBytes(hello.AsSpan(16, 16));
        name.CopyTo(hello, 32);
        var h = new FrameHeader { Type = FrameType.Hello, Length = (uint)hello.Length };
        if (flagged)
        {
            h.Flags = FrameHeader.FlagStreams;
            h.Chunk = (uint)stream;
            h.RegionKey = set;
            h.Aux = abandoned;
        }
        await TcpStallReviewTests.SendAsync(s, h, hello);
        var b = new byte[FrameHeader.Size];
        await s.ReadExactlyAsync(b).AsTask().WaitAsync(Bound);
        Assert.Equal(FrameType.HelloOk, FrameHeader.Read(b).Type);
        return (client, s);
    }

    private static async Task<bool> IsClosedAsync(NetworkStream s)
    {
        // A fence answered: alive. The end of the stream (or a reset): closed by the target.
        try
        {
            await TcpStallReviewTests.SendAsync(s, new FrameHeader { Type = FrameType.Fence, RequestId = 9 });
            var b = new byte[FrameHeader.Size];
            int n = await s.ReadAsync(b).AsTask().WaitAsync(Bound);
            return n == 0;
        }
        catch (IOException)
        {
            return true;
        }
    }

    [Fact]
    public async Task A_hello_stops_the_same_streams_older_session_and_those_it_says_it_abandoned_but_no_others()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target" });
        var me = Guid.NewGuid();
        const ulong set = 77;
        var s0 = await HelloAsync(target, me, set, 0, 0);
        var s1 = await HelloAsync(target, me, set, 1, 0);
        var s2 = await HelloAsync(target, me, set, 2, 0);
        var otherSet = await HelloAsync(target, me, set + 1, 0, 0);
        var otherPeer = await HelloAsync(target, Guid.NewGuid(), set, 0, 0);
        var unflagged = await HelloAsync(target, me, 0, 0, 0, flagged: false);

        // Stream 0 again, saying stream 2 was abandoned: the old stream 0 and stream 2 go; stream 1 and the others stay.
        var again = await HelloAsync(target, me, set, 0, 1u << 2);

        Assert.True(await IsClosedAsync(s0.Stream), "the older connection of the same stream was left running");
        Assert.True(await IsClosedAsync(s2.Stream), "the connection the initiator said it abandoned was left running");
        Assert.False(await IsClosedAsync(s1.Stream));
        Assert.False(await IsClosedAsync(otherSet.Stream));
        Assert.False(await IsClosedAsync(otherPeer.Stream));
        Assert.False(await IsClosedAsync(unflagged.Stream));
        Assert.False(await IsClosedAsync(again.Stream));
        foreach (var c in new[] { s0, s1, s2, otherSet, otherPeer, unflagged, again })
            c.Client.Dispose();
    }

    [Fact]
    public async Task Several_streams_of_one_initiator_do_not_supersede_each_other()
    {
        const int length = 1 << 20;
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", MaxChunkBytes = 64 * 1024 });
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "initiator", MaxChunkBytes = 64 * 1024, TcpStreams = 4 });
        using var destination = new AnonymousMemory(length);
        using var source = new AnonymousMemory(length);
        target.Register(destination);
        initiator.Register(source);
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        MemoryDescriptor[] local = [MemoryDescriptor.Of(source.Address, length)];
        MemoryDescriptor[] far = [MemoryDescriptor.Of(destination.Address, length)];
        for (int round = 0; round < 3; round++)
        {
            source.GetSpan(0, length).Fill((byte)(0x10 + round));
            var w = initiator.Prepare(TransferOp.Write, local, remote, far, new TransferOptions { Backend = BackendKind.Tcp, Streams = 4 });
            var r = await initiator.PostAsync(w);
            Assert.Equal(TransferStatus.Success, r.Status);
            Assert.True(destination.GetSpan(0, length).IndexOfAnyExcept((byte)(0x10 + round)) < 0);
        }
    }
}
