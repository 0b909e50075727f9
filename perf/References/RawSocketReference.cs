using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using KvFabric.Memory;

namespace KvFabric.Bench.References;

/// <summary>
/// What TCP can do for these very blocks: a plain blocking send loop in this process to a blocking receive loop in a
/// child process, over the same number of distinct blocks of the same size (out of cache, like the transfer), with no
/// framing, acknowledgements or protocol. KvFabric's TCP backend over this ratio is the cost of its layer.
/// </summary>
public static class RawSocketReference
{
    public static async Task<IReadOnlyList<double>> MeasureAsync(long blockBytes, int blocks, int runs, int warmups, CancellationToken ct)
    {
        using var listener = new Socket(SocketType.Stream, ProtocolType.Tcp);
        listener.Bind(new IPEndPoint(IPAddress.Loopback, 0));
        listener.Listen(1);
        int port = ((IPEndPoint)listener.LocalEndPoint!).Port;
        long total = blockBytes * blocks;
        string self = Path.Combine(AppContext.BaseDirectory, "kvfabric-bench.dll");
        using var sink = Tool.Start("dotnet", self, "raw-sink", "--port", port.ToString(CultureInfo.InvariantCulture),
            "--block-bytes", blockBytes.ToString(CultureInfo.InvariantCulture), "--blocks", blocks.ToString(CultureInfo.InvariantCulture));
        try
        {
            using var socket = await listener.AcceptAsync(ct).AsTask().WaitAsync(TimeSpan.FromSeconds(30), ct).ConfigureAwait(false);
            socket.NoDelay = true;
            using var src = new AnonymousMemory(total);
            Touch(src);
            var gbps = new List<double>();
            byte[] ack = new byte[1];
            for (int r = 0; r < warmups + runs; r++)
            {
                long start = Stopwatch.GetTimestamp();
                for (int b = 0; b < blocks; b++)
                    SendAll(socket, src.Address + (nint)(b * blockBytes), blockBytes);
                // The sink acknowledges each run once everything landed, so the figure is bytes delivered, not buffered.
                if (socket.Receive(ack) != 1)
                    throw new IOException("the raw sink closed early");
                double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
                if (r >= warmups)
                    gbps.Add(total / seconds / 1e9);
            }
            socket.Shutdown(SocketShutdown.Send);
            return gbps;
        }
        finally
        {
            if (!sink.HasExited)
                sink.Kill();
        }
    }

    private static unsafe void Touch(AnonymousMemory m)
    {
        for (long o = 0; o < m.Length; o += 4096)
            ((byte*)m.Address)[o] = (byte)o;
    }

    private static unsafe void SendAll(Socket s, nint p, long n)
    {
        var span = new ReadOnlySpan<byte>((void*)p, (int)n);
        while (!span.IsEmpty)
            span = span[s.Send(span)..];
    }

    /// <summary>The receiving half, run as `kvfabric-bench raw-sink` in a child process.</summary>
    public static Command SinkCommand()
    {
        var port = new Option<int>("--port") { Required = true };
        var blockBytes = new Option<long>("--block-bytes") { Required = true };
        var blocks = new Option<int>("--blocks") { Required = true };
        var cmd = new Command("raw-sink", "Internal: the receiving side of the raw-socket reference.") { port, blockBytes, blocks };
        cmd.Hidden = true;
        cmd.SetAction(p => RunSink(p.GetValue(port), p.GetValue(blockBytes), p.GetValue(blocks)));
        return cmd;
    }

    private static unsafe int RunSink(int port, long blockBytes, int blocks)
    {
        using var dst = new AnonymousMemory(blockBytes * blocks);
        Touch(dst);
        using var s = new Socket(SocketType.Stream, ProtocolType.Tcp);
        s.Connect(IPAddress.Loopback, port);
        s.NoDelay = true;
        while (true)
        {
            for (int b = 0; b < blocks; b++)
            {
                var span = new Span<byte>((byte*)dst.Address + b * blockBytes, (int)blockBytes);
                while (!span.IsEmpty)
                {
                    int n = s.Receive(span);
                    if (n == 0)
                        return 0;
                    span = span[n..];
                }
            }
            s.Send([1]);
        }
    }
}
