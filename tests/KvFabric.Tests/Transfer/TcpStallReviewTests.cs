using System.Net.Sockets;
using System.Text;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>An initiator that stops in the middle of a frame must not hold the target's regions (and a session thread) for ever.</summary>
public sealed class TcpStallReviewTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    // A raw initiator's handshake and frames (also used by TcpTargetStallTests and DeregistrationRetryTests).
    internal static async Task<NetworkStream> HandshakeAsync(TcpClient client, TransferAgent target)
    {
        await client.ConnectAsync(target.TcpEndpoint).WaitAsync(Bound);
        var stream = client.GetStream();
        byte[] name = Encoding.UTF8.GetBytes("stalling");
        byte[] hello = new byte[32 + name.Length];
        target.AgentId.TryWriteBytes(hello.AsSpan(0, 16));
        Guid.NewGuid().TryWriteBytes(hello.AsSpan(16, 16));
        name.CopyTo(hello, 32);
        await SendAsync(stream, new FrameHeader { Type = FrameType.Hello, Length = (uint)hello.Length }, hello);
        var b = new byte[FrameHeader.Size];
        await stream.ReadExactlyAsync(b).AsTask().WaitAsync(Bound);
        Assert.Equal(FrameType.HelloOk, FrameHeader.Read(b).Type);
        return stream;
    }

    internal static async Task SendAsync(NetworkStream stream, FrameHeader h, byte[]? payload = null)
    {
        var b = new byte[FrameHeader.Size];
        h.Write(b);
        await stream.WriteAsync(b);
        if (payload is not null)
            await stream.WriteAsync(payload);
    }

    [Fact]
    public async Task A_write_that_stalls_mid_payload_does_not_keep_the_region_from_being_deregistered()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromSeconds(1) });
        using var memory = new AnonymousMemory(64 * 1024);
        var region = target.Register(memory);
        using var client = new TcpClient();
        var stream = await HandshakeAsync(client, target);

        // A WRITE of 4 KiB of which only 100 bytes come; the initiator then goes silent without closing.
        await SendAsync(stream, new FrameHeader { Type = FrameType.Write, RequestId = 1, RegionId = region.Id, RegionKey = region.Key.Value, Length = 4096 },
            Enumerable.Repeat((byte)0xAB, 100).ToArray());
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (memory.GetSpan(99, 1)[0] != 0xAB)
        {
            Assert.True(clock.Elapsed < Bound, "the target never started receiving the WRITE");
            await Task.Delay(10);
        }

        // The target is inside the frame, holding the region: it must give up on the stalled peer, not on deregistration.
        await target.DeregisterAsync(region, TimeSpan.FromSeconds(30));
    }

    [Fact]
    public async Task A_reader_that_stops_taking_its_data_does_not_keep_the_region_from_being_deregistered()
    {
        const int chunk = 4 << 20;
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromSeconds(1) });
        using var memory = new AnonymousMemory(chunk);
        var region = target.Register(memory);
        using var client = new TcpClient();
        client.ReceiveBufferSize = 64 * 1024;
        var stream = await HandshakeAsync(client, target);

        // 64 MiB of READ requests, far more than the sockets buffer; the reader takes one header and then nothing.
        for (int i = 0; i < 16; i++)
            await SendAsync(stream, new FrameHeader { Type = FrameType.ReadRequest, RequestId = 1, Chunk = (uint)i, RegionId = region.Id, RegionKey = region.Key.Value, Length = chunk });
        var b = new byte[FrameHeader.Size];
        await stream.ReadExactlyAsync(b).AsTask().WaitAsync(Bound);
        Assert.Equal(FrameType.ReadData, FrameHeader.Read(b).Type);

        await target.DeregisterAsync(region, TimeSpan.FromSeconds(30));
    }

    [Fact]
    public async Task An_idle_connection_outlives_the_stall_timeout()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromMilliseconds(200) });
        using var memory = new AnonymousMemory(64 * 1024);
        var region = target.Register(memory);
        using var client = new TcpClient();
        var stream = await HandshakeAsync(client, target);

        // Idle between frames for many stall timeouts: that is a connection kept for the next transfer, not a stall.
        await Task.Delay(TimeSpan.FromSeconds(2));
        await SendAsync(stream, new FrameHeader { Type = FrameType.Write, RequestId = 7, RegionId = region.Id, RegionKey = region.Key.Value, Length = 4096 },
            Enumerable.Repeat((byte)0xCD, 4096).ToArray());
        var b = new byte[FrameHeader.Size];
        await stream.ReadExactlyAsync(b).AsTask().WaitAsync(Bound);
        var ack = FrameHeader.Read(b);

        Assert.Equal(FrameType.WriteAck, ack.Type);
        Assert.Equal(WireStatus.Ok, ack.Status);
        Assert.Equal(0xCD, memory.GetSpan(4095, 1)[0]);
    }

    [Fact]
    public async Task A_handshake_dribbled_a_byte_at_a_time_is_cut_off_at_the_connect_timeout()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", ConnectTimeout = TimeSpan.FromSeconds(1) });
        using var client = new TcpClient();
        await client.ConnectAsync(target.TcpEndpoint).WaitAsync(Bound);
        var stream = client.GetStream();
        // A HELLO announcing 1,000 bytes, which then come one every 100 ms: every single receive is well within the
        // connect timeout, the handshake as a whole never is. Such clients could hold all MaxInboundConnections.
        await SendAsync(stream, new FrameHeader { Type = FrameType.Hello, Length = 1000 });
        var closed = stream.ReadAsync(new byte[1]).AsTask();
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!closed.IsCompleted && clock.Elapsed < Bound)
        {
            try
            {
                await stream.WriteAsync(new byte[1]);
            }
            catch (IOException)
            {
                break;
            }
            await Task.WhenAny(closed, Task.Delay(100));
        }

        Assert.True(closed.IsCompleted, "the target still waits for the handshake after a minute");
    }
}
