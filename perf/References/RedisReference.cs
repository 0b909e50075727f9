using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace KvFabric.Bench.References;

/// <summary>SET and GET throughput of one redis-benchmark run, in GB/s (requests/s x value bytes).</summary>
public sealed record RedisFigures(double SetGbps, double GetGbps);

/// <summary>
/// A popular remote KV store, what LMCache's remote tier uses: a private redis-server on a loopback port (no RDB, no AOF,
/// a temporary directory) driven by redis-benchmark SET and GET with the block size as the value size, the given number
/// of clients, no pipelining. redis-benchmark reuses one key (no -r), so the value stays cache-resident on the server.
/// </summary>
public static class RedisReference
{
    public static bool IsInstalled() => Tool.Exists("redis-server") && Tool.Exists("redis-benchmark");

    /// <summary>Starts the server, runs warm-up runs (untimed) then measured runs; the server is stopped and its directory removed.</summary>
    public static async Task<IReadOnlyList<RedisFigures>> MeasureAsync(long valueBytes, int requests, int clients, int runs, int warmups, CancellationToken ct)
    {
        if (valueBytes > 512L << 20)
            throw new ArgumentOutOfRangeException(nameof(valueBytes), valueBytes, "redis values are at most 512 MiB");
        string dir = Directory.CreateTempSubdirectory("kvfabric-redis-ref").FullName;
        int port = FreePort();
        string portText = port.ToString(CultureInfo.InvariantCulture);
        using var server = Tool.Start("redis-server", "--port", portText, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", dir, "--protected-mode", "no", "--daemonize", "no", "--loglevel", "warning");
        try
        {
            await WaitForPortAsync(port, ct).ConfigureAwait(false);
            var figures = new List<RedisFigures>();
            for (int r = 0; r < warmups + runs; r++)
            {
                string csv = await Tool.RunAsync(TimeSpan.FromMinutes(5), ct, "redis-benchmark", "-h", "127.0.0.1", "-p", portText,
                    "-t", "set,get", "-d", valueBytes.ToString(CultureInfo.InvariantCulture), "-n", requests.ToString(CultureInfo.InvariantCulture),
                    "-c", clients.ToString(CultureInfo.InvariantCulture), "-P", "1", "--csv").ConfigureAwait(false);
                var rps = ParseCsv(csv);
                if (r >= warmups)
                    figures.Add(new RedisFigures(rps["SET"] * valueBytes / 1e9, rps["GET"] * valueBytes / 1e9));
            }
            return figures;
        }
        finally
        {
            if (!server.HasExited)
                server.Kill();
            await server.WaitForExitAsync(CancellationToken.None).ConfigureAwait(false);
            Directory.Delete(dir, recursive: true);
        }
    }

    /// <summary>
    /// Requests per second by test name from redis-benchmark --csv: a header line ("test","rps",...) then one line per test
    /// ("SET","12345.67",...); older versions print no header. Quotes are stripped.
    /// </summary>
    public static Dictionary<string, double> ParseCsv(string csv)
    {
        var rps = new Dictionary<string, double>(StringComparer.OrdinalIgnoreCase);
        foreach (string line in csv.Split('\n', StringSplitOptions.RemoveEmptyEntries | StringSplitOptions.TrimEntries))
        {
            var fields = line.Split(',').Select(f => f.Trim('"')).ToArray();
            if (fields.Length >= 2 && double.TryParse(fields[1], NumberStyles.Float, CultureInfo.InvariantCulture, out double value))
                rps[fields[0]] = value;
        }
        if (!rps.ContainsKey("SET") || !rps.ContainsKey("GET"))
            throw new FormatException($"redis-benchmark printed no SET and GET figures: {csv}");
        return rps;
    }

    internal static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    internal static async Task WaitForPortAsync(int port, CancellationToken ct)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (true)
        {
            try
            {
                using var probe = new TcpClient();
                await probe.ConnectAsync(IPAddress.Loopback, port, ct).ConfigureAwait(false);
                return;
            }
            catch (SocketException) when (DateTime.UtcNow < deadline)
            {
                await Task.Delay(20, ct).ConfigureAwait(false);
            }
        }
    }
}
