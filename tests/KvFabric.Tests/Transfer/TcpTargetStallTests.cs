using System.Net.Sockets;
using System.Text;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;
using static KvFabric.Tests.Transfer.TcpStallReviewTests;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// The target's stall bound is per frame, not per receive: a peer that keeps a frame open by trickling its bytes (or by
/// taking a READ's reply a little at a time) is cut off at the frame's deadline and cannot hold a region.
/// </summary>
public sealed class TcpTargetStallTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    // From the reviewer's XferReviewTests: SO_RCVTIMEO bounds each recv(), so one byte every StallTimeout/2 never tripped it.
    [Fact]
    public async Task A_write_trickled_one_byte_per_half_stall_timeout_does_not_hold_the_region()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromSeconds(1) });
        using var memory = new AnonymousMemory(64 * 1024);
        var region = target.Register(memory);
        using var client = new TcpClient();
        var stream = await HandshakeAsync(client, target);
        await SendAsync(stream, new FrameHeader { Type = FrameType.Write, RequestId = 1, RegionId = region.Id, RegionKey = region.Key.Value, Length = 4096 },
            Enumerable.Repeat((byte)0xAB, 100).ToArray());
        using var stop = new CancellationTokenSource();
        var trickle = Task.Run(async () =>
        {
            try
            {
                while (!stop.IsCancellationRequested)
                {
                    await Task.Delay(400, stop.Token);
                    await stream.WriteAsync(new byte[] { 0xAB }, stop.Token);
                }
            }
            catch (Exception)
            {
                // Cut off by the target (the point of the test), or stopped.
            }
        });
        await Task.Delay(300);
        // The frame's deadline is about 1 s here; 30 s leaves a noisy machine plenty of room and is still 30 deadlines.
        Exception? failed = await Record.ExceptionAsync(() => target.DeregisterAsync(region, TimeSpan.FromSeconds(30)));
        await stop.CancelAsync();
        await trickle;
        Assert.Null(failed);
    }

    // The reply side: the frame deadline also bounds a READ's reply taken a little at a time (16 chunks of 4 MiB at
    // 160 KiB/s would take 7 minutes). This one also passed before the per-frame deadline: here the kernel wakes a
    // blocked send only once much of its buffer drained, so the per-send SO_SNDTIMEO tripped; a reader pacing its reads
    // to wake every send would not trip it, and the frame deadline does not depend on that.
    [Fact]
    public async Task A_reader_that_takes_its_reply_a_little_at_a_time_does_not_hold_the_region()
    {
        const int chunk = 4 << 20;
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromSeconds(1) });
        using var memory = new AnonymousMemory(chunk);
        var region = target.Register(memory);
        using var client = new TcpClient();
        client.ReceiveBufferSize = 64 * 1024;
        var stream = await HandshakeAsync(client, target);
        for (int i = 0; i < 16; i++)
            await SendAsync(stream, new FrameHeader { Type = FrameType.ReadRequest, RequestId = 1, Chunk = (uint)i, RegionId = region.Id, RegionKey = region.Key.Value, Length = chunk });
        using var stop = new CancellationTokenSource();
        var sip = Task.Run(async () =>
        {
            var piece = new byte[64 * 1024];
            try
            {
                while (!stop.IsCancellationRequested)
                {
                    await Task.Delay(400, stop.Token);
                    if (await stream.ReadAsync(piece, stop.Token) == 0)
                        return;
                }
            }
            catch (Exception)
            {
                // Cut off by the target (the point of the test), or stopped.
            }
        });
        await Task.Delay(300);
        // The frame's deadline is about 5 s here (1 s plus 4 MiB at 1 MiB/s); 60 s is generous for a noisy machine.
        Exception? failed = await Record.ExceptionAsync(() => target.DeregisterAsync(region, TimeSpan.FromSeconds(60)));
        await stop.CancelAsync();
        await sip;
        Assert.Null(failed);
    }

    [Fact]
    public void A_frames_deadline_is_the_stall_timeout_plus_its_length_at_the_floor_rate()
    {
        Assert.Equal(TimeSpan.FromSeconds(30), TcpServerSession.FrameDeadline(0, TimeSpan.FromSeconds(30)));
        Assert.Equal(TimeSpan.FromSeconds(34), TcpServerSession.FrameDeadline(4 << 20, TimeSpan.FromSeconds(30)));
    }

    [Fact]
    public async Task A_hello_announcing_a_megabyte_is_refused_before_the_target_waits_for_it()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", ConnectTimeout = TimeSpan.FromSeconds(30) });
        using var client = new TcpClient();
        await client.ConnectAsync(target.TcpEndpoint).WaitAsync(Bound);
        var stream = client.GetStream();
        // Unauthenticated: before the fix the target allocated the 1 MiB and waited for it (256 such peers: 256 MiB).
        await SendAsync(stream, new FrameHeader { Type = FrameType.Hello, Length = 1 << 20 });
        var b = new byte[FrameHeader.Size];
        await stream.ReadExactlyAsync(b).AsTask().WaitAsync(TimeSpan.FromSeconds(20));
        var h = FrameHeader.Read(b);
        Assert.Equal(FrameType.Error, h.Type);
        var text = new byte[h.Length];
        await stream.ReadExactlyAsync(text).AsTask().WaitAsync(Bound);
        Assert.Contains("HELLO payload of 1048576 bytes is malformed", Encoding.UTF8.GetString(text));
        Assert.Equal(1, target.Stats.MalformedFrames);
    }

    [Fact]
    public void A_long_agent_name_is_cut_at_a_character_boundary_in_the_hello()
    {
        string name = new string('a', TcpServerSession.MaxHelloNameBytes - 1) + "\u00e9\u00e9"; // 2-byte characters straddling the limit
        byte[] cut = TcpConnection.HelloName(name);
        Assert.Equal(TcpServerSession.MaxHelloNameBytes - 1, cut.Length);
        Assert.Equal(new string('a', TcpServerSession.MaxHelloNameBytes - 1), Encoding.UTF8.GetString(cut));
        Assert.Equal("prefill-0"u8.ToArray(), TcpConnection.HelloName("prefill-0"));
    }
}
