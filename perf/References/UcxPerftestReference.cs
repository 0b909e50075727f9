using System.Globalization;

namespace KvFabric.Bench.References;

/// <summary>
/// UCX's own bandwidth test on loopback: `ucx_perftest` as server and client, `-t ucp_put_bw -s bytes -n iters`, with
/// UCX_TLS (and segment sizes) chosen by the caller (tcp for the TCP backend's counterpart, posix,self for shared memory). Each run is its own
/// server/client pair; `-w` warm-up iterations are excluded by ucx_perftest itself. The figure is its final
/// overall bandwidth (MB/s, where ucx_perftest's MB is 2^20 bytes) as GB/s (10^9 bytes).
/// </summary>
public static class UcxPerftestReference
{
    public static bool IsInstalled() => Tool.Exists("ucx_perftest");

    public static async Task<IReadOnlyList<double>> MeasureAsync(IReadOnlyList<string> environment, long messageBytes, int iterations, int warmupIterations, int runs, CancellationToken ct)
    {
        var gbps = new List<double>();
        for (int r = 0; r < runs; r++)
        {
            int port = RedisReference.FreePort();
            string portText = port.ToString(CultureInfo.InvariantCulture);
            using var server = Tool.Start("env", [.. environment, "ucx_perftest", "-p", portText]);
            try
            {
                // The server listens on its exchange port before the client may connect.
                await WaitForListenerAsync(port, ct).ConfigureAwait(false);
                string csv = await Tool.RunAsync(TimeSpan.FromMinutes(3), ct, "env", [.. environment, "ucx_perftest", "127.0.0.1", "-p", portText,
                    "-t", "ucp_put_bw", "-s", messageBytes.ToString(CultureInfo.InvariantCulture),
                    "-n", iterations.ToString(CultureInfo.InvariantCulture), "-w", warmupIterations.ToString(CultureInfo.InvariantCulture),
                    "-f", "-v"]).ConfigureAwait(false);
                gbps.Add(ParseOverallMBps(csv) * (1 << 20) / 1e9);
            }
            finally
            {
                if (!server.HasExited)
                    server.Kill();
            }
        }
        return gbps;
    }

    // A probe connection would be taken as the server's one client, so look for the LISTEN socket (IPv4 or IPv6) instead.
    private static async Task WaitForListenerAsync(int port, CancellationToken ct)
    {
        string local = $":{port:X4} ";
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (DateTime.UtcNow < deadline)
        {
            foreach (string table in new[] { "/proc/net/tcp", "/proc/net/tcp6" })
            {
                if (!File.Exists(table))
                    continue;
                foreach (string line in await File.ReadAllLinesAsync(table, ct).ConfigureAwait(false))
                {
                    var fields = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
                    if (fields.Length > 3 && (fields[1] + " ").EndsWith(local, StringComparison.Ordinal) && fields[3] == "0A")
                        return;
                }
            }
            await Task.Delay(20, ct).ConfigureAwait(false);
        }
        throw new TimeoutException($"ucx_perftest server did not listen on port {port} within 10 s");
    }

    /// <summary>
    /// UCX settings as NAME=VALUE for env(1), optionally with UCX_TCP_TX/RX_SEG_SIZE. Measured here at 2 MiB puts: on the
    /// loaded 2-core VM UCX's default 8 KiB tcp segments crawled (0.05 GB/s) where 2 MiB segments gave 0.3-0.9 GB/s; on a
    /// quieter one the defaults gave 1.5 GB/s and 2 MiB segments 0.6. `compare` measures both and uses the faster.
    /// </summary>
    public static string[] Environment(string transports, long segmentBytes = 0) => segmentBytes <= 0
        ? [$"UCX_TLS={transports}"]
        : [$"UCX_TLS={transports}", $"UCX_TCP_TX_SEG_SIZE={segmentBytes}", $"UCX_TCP_RX_SEG_SIZE={segmentBytes}"];

    /// <summary>The overall_bw column (MB/s) of `ucx_perftest -f -v`'s CSV: a header line, then the final line.</summary>
    public static double ParseOverallMBps(string csv)
    {
        var lines = csv.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries);
        int header = Array.FindIndex(lines, l => l.StartsWith("iterations,", StringComparison.Ordinal));
        if (header < 0 || header + 1 >= lines.Length)
            throw new FormatException($"ucx_perftest printed no CSV figures: {csv}");
        int column = Array.IndexOf(lines[header].Split(','), "overall_bw");
        var values = lines[^1].Split(',');
        if (column < 0 || column >= values.Length)
            throw new FormatException($"ucx_perftest printed no overall_bw: {csv}");
        return double.Parse(values[column].Trim(), NumberStyles.Float, CultureInfo.InvariantCulture);
    }
}
