using System.Globalization;
using System.Text.RegularExpressions;

namespace KvFabric.Bench.References;

/// <summary>
/// A second set of unary callers for the gRPC service: h2load (nghttp2's HTTP/2 load generator, in C) posts the same
/// gRPC request on `streams` concurrent HTTP/2 streams of `connections` connections, each stream sending its next
/// request when the previous answer arrived (a closed loop, as the bench's own callers). It costs a few microseconds of
/// CPU per call where HttpClient's HTTP/2 client costs tens, so on a small machine shared by client and server it shows
/// what the server does with the cores to itself. Latency per request comes from h2load's --log-file (main duration only,
/// after two warm-up seconds).
/// </summary>
public static partial class H2loadReference
{
    /// <summary>Seconds h2load runs before it logs (the server's hot paths reach tier 1 meanwhile).</summary>
    public const int WarmUpSeconds = 2;

    public const string Package = "nghttp2-client";

    public static bool IsInstalled() => Tool.Exists("h2load");

    public sealed record Result(double CallsPerSecond, double P50Us, double P99Us, long Calls);

    /// <param name="grpcFrame">The request as it goes on the wire: the 5-byte gRPC prefix and the protobuf message.</param>
    /// <param name="minResponseBytes">Bytes of response body every successful call returns at least (a gRPC frame); a call
    /// answered with an error status carries none, so fewer bytes in all means some calls failed.</param>
    public static async Task<Result> MeasureAsync(Uri address, string path, byte[] grpcFrame, IReadOnlyDictionary<string, string> headers,
        int connections, int streams, double seconds, int minResponseBytes, CancellationToken ct)
    {
        string dir = Directory.CreateTempSubdirectory("kvfabric-h2load-").FullName;
        try
        {
            string body = Path.Combine(dir, "request.bin"), log = Path.Combine(dir, "requests.log");
            await File.WriteAllBytesAsync(body, grpcFrame, ct).ConfigureAwait(false);
            var args = new List<string>
            {
                "-D", seconds.ToString("0.###", CultureInfo.InvariantCulture), "--warm-up-time", WarmUpSeconds.ToString(CultureInfo.InvariantCulture),
                "-c", connections.ToString(CultureInfo.InvariantCulture), "-m", ((streams + connections - 1) / connections).ToString(CultureInfo.InvariantCulture),
                "-d", body, "--log-file", log,
                "-H", "content-type: application/grpc", "-H", "te: trailers",
            };
            foreach (var (name, value) in headers)
                args.AddRange(["-H", $"{name}: {value}"]);
            args.Add(new Uri(address, path).ToString());
            string output = await Tool.RunAsync(TimeSpan.FromSeconds(seconds + 60), ct, "h2load", [.. args]).ConfigureAwait(false);

            var requests = RequestsLine().Match(output);
            var traffic = DataBytes().Match(output);
            if (!requests.Success || !traffic.Success)
                throw new InvalidOperationException($"h2load's summary was not understood: {output}");
            long done = long.Parse(requests.Groups["done"].Value, CultureInfo.InvariantCulture);
            long succeeded = long.Parse(requests.Groups["ok"].Value, CultureInfo.InvariantCulture);
            long data = long.Parse(traffic.Groups["data"].Value, CultureInfo.InvariantCulture);
            if (done == 0 || succeeded != done || data < done * minResponseBytes)
                throw new InvalidOperationException($"h2load: {succeeded} of {done} requests succeeded with {data} bytes of responses "
                    + $"(at least {minResponseBytes} each expected): the calls failed, the figure would measure errors. {output}");

            // Each line: start time (us since the epoch), HTTP status, duration (us).
            var durations = (await File.ReadAllLinesAsync(log, ct).ConfigureAwait(false))
                .Select(l => l.Split('\t', ' '))
                .Where(f => f.Length >= 3)
                .Select(f => double.Parse(f[2], CultureInfo.InvariantCulture))
                .Order().ToArray();
            if (durations.Length == 0)
                throw new InvalidOperationException($"h2load logged no requests in {log}: {output}");
            return new Result(durations.Length / seconds, Reporting.Spread.Percentile(durations, 50), Reporting.Spread.Percentile(durations, 99), durations.Length);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [GeneratedRegex(@"requests: \d+ total, \d+ started, (?<done>\d+) done, (?<ok>\d+) succeeded")]
    private static partial Regex RequestsLine();

    [GeneratedRegex(@"traffic: .*, [\d.]+\w* \((?<data>\d+)\) data")]
    private static partial Regex DataBytes();
}
