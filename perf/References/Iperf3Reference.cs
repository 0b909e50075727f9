using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Text.Json;

namespace KvFabric.Bench.References;

/// <summary>
/// The loopback TCP limit: iperf3 with the same write size (the block size, capped at iperf3's 1 MiB maximum) and
/// the same number of parallel streams, one short run per measurement, the first second omitted as warm-up.
/// </summary>
public static class Iperf3Reference
{
    public const long MaxWriteBytes = 1 << 20;

    public static long WriteBytes(long blockBytes) => Math.Min(blockBytes, MaxWriteBytes);

    public static bool IsInstalled() => Tool.Exists("iperf3");

    public static async Task<IReadOnlyList<double>> MeasureAsync(long blockBytes, int streams, int runs, double secondsPerRun, CancellationToken ct)
    {
        var gbps = new List<double>();
        for (int r = 0; r < runs; r++)
        {
            int port = FreePort();
            using var server = Tool.Start("iperf3", "-s", "-1", "-B", "127.0.0.1", "-p", port.ToString(CultureInfo.InvariantCulture));
            try
            {
                await WaitForListenerAsync(port, ct).ConfigureAwait(false);
                string json = await Tool.RunAsync(TimeSpan.FromSeconds(secondsPerRun + 30), ct, "iperf3", "-c", "127.0.0.1", "-p", port.ToString(CultureInfo.InvariantCulture),
                    "-l", WriteBytes(blockBytes).ToString(CultureInfo.InvariantCulture), "-P", streams.ToString(CultureInfo.InvariantCulture),
                    "-t", secondsPerRun.ToString(CultureInfo.InvariantCulture), "-O", "1", "-J").ConfigureAwait(false);
                using var doc = JsonDocument.Parse(json);
                double bits = doc.RootElement.GetProperty("end").GetProperty("sum_received").GetProperty("bits_per_second").GetDouble();
                gbps.Add(bits / 8 / 1e9);
            }
            finally
            {
                if (!server.HasExited)
                    server.Kill();
            }
        }
        return gbps;
    }

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }

    // A probe connection would count as iperf3's one client under -1, so look for the LISTEN socket instead.
    private static async Task WaitForListenerAsync(int port, CancellationToken ct)
    {
        string needle = $":{port:X4} 00000000:0000 0A";
        var clock = Stopwatch.StartNew();
        while (clock.Elapsed < TimeSpan.FromSeconds(10))
        {
            if ((await File.ReadAllTextAsync("/proc/net/tcp", ct).ConfigureAwait(false)).Contains(needle, StringComparison.Ordinal))
                return;
            await Task.Delay(20, ct).ConfigureAwait(false);
        }
        throw new TimeoutException($"iperf3 server did not listen on port {port} within 10 s");
    }
}

/// <summary>Runs external reference tools with deadlines.</summary>
public static class Tool
{
    public static bool Exists(string name) =>
        (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Any(d => File.Exists(Path.Combine(d, name)));

    public static Process Start(string file, params string[] args)
    {
        var psi = new ProcessStartInfo(file) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new InvalidOperationException($"could not start {file}");
    }

    public static async Task<string> RunAsync(TimeSpan timeout, CancellationToken ct, string file, params string[] args)
    {
        using var p = Start(file, args);
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
        cts.CancelAfter(timeout);
        var stdout = p.StandardOutput.ReadToEndAsync(cts.Token);
        var stderr = p.StandardError.ReadToEndAsync(cts.Token);
        try
        {
            await p.WaitForExitAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            throw new TimeoutException($"{file} {string.Join(' ', args)} did not finish within {timeout.TotalSeconds:0} s");
        }
        string output = await stdout.ConfigureAwait(false);
        if (p.ExitCode != 0)
            throw new InvalidOperationException($"{file} {string.Join(' ', args)} exited with {p.ExitCode}: {await stderr.ConfigureAwait(false)} {output}");
        return output;
    }
}
