using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Net.Sockets;

namespace KvFabric.Bench.References;

/// <summary>
/// The UCX limit on this machine: ucx_perftest (ucx-utils) as server and client on loopback, `-t ucp_put_bw` with the
/// same message size and the same UCX_TLS as the transfer. Reports the "overall" bandwidth of the Final line.
/// </summary>
public static class UcxPerftestReference
{
    public static bool IsInstalled() => Tool.Exists("ucx_perftest");

    public static string Command(long messageBytes, int iterations, string tls) =>
        $"UCX_TLS={tls} ucx_perftest -t ucp_put_bw -s {messageBytes} -n {iterations} -p PORT (server) + the same with 127.0.0.1 (client)";

    public static async Task<IReadOnlyList<double>> MeasureAsync(long messageBytes, int iterations, string tls, int runs, CancellationToken ct)
    {
        var gbps = new List<double>();
        for (int r = 0; r < runs; r++)
        {
            int port = FreePort();
            string[] common = ["-t", "ucp_put_bw", "-s", messageBytes.ToString(CultureInfo.InvariantCulture), "-n", iterations.ToString(CultureInfo.InvariantCulture), "-p", port.ToString(CultureInfo.InvariantCulture)];
            using var server = Start(tls, common);
            try
            {
                await Task.Delay(300, ct).ConfigureAwait(false); // the server binds its port at once; give it a moment
                string output = "";
                for (int attempt = 0; attempt < 20 && output.Length == 0; attempt++)
                {
                    using var client = Start(tls, ["127.0.0.1", .. common]);
                    using var cts = CancellationTokenSource.CreateLinkedTokenSource(ct);
                    cts.CancelAfter(TimeSpan.FromSeconds(120));
                    var stdout = client.StandardOutput.ReadToEndAsync(cts.Token);
                    var stderr = client.StandardError.ReadToEndAsync(cts.Token);
                    await client.WaitForExitAsync(cts.Token).ConfigureAwait(false);
                    string text = await stdout.ConfigureAwait(false);
                    if (client.ExitCode == 0)
                        output = text;
                    else if (attempt == 19)
                        throw new InvalidOperationException($"ucx_perftest client failed ({client.ExitCode}): {await stderr.ConfigureAwait(false)} {text}");
                    else
                        await Task.Delay(200, ct).ConfigureAwait(false); // server not listening yet
                }
                gbps.Add(ParseFinalOverallMBps(output) * (1 << 20) / 1e9);
            }
            finally
            {
                if (!server.HasExited)
                    server.Kill();
            }
        }
        return gbps;
    }

    /// <summary>The overall bandwidth (MB/s, MB = 2^20 bytes as ucx_perftest prints it) of the "Final:" line.</summary>
    public static double ParseFinalOverallMBps(string output)
    {
        // Final: iterations, 50%ile, average and overall latency (us), average and overall bandwidth (MB/s), message rates.
        string line = output.Split('\n').LastOrDefault(l => l.TrimStart().StartsWith("Final:", StringComparison.Ordinal))
            ?? throw new InvalidOperationException($"ucx_perftest printed no Final line: {output}");
        var f = line.Split(' ', StringSplitOptions.RemoveEmptyEntries);
        return double.Parse(f[6], CultureInfo.InvariantCulture);
    }

    private static Process Start(string tls, string[] args)
    {
        var psi = new ProcessStartInfo("ucx_perftest") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        psi.Environment["UCX_TLS"] = tls;
        foreach (var a in args)
            psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new InvalidOperationException("could not start ucx_perftest (install ucx-utils)");
    }

    private static int FreePort()
    {
        using var l = new TcpListener(IPAddress.Loopback, 0);
        l.Start();
        return ((IPEndPoint)l.LocalEndpoint).Port;
    }
}
