using System.Globalization;
using System.Text.Json;
using System.Text.Json.Nodes;
using KvFabric.Tiers.Replay;
using KvFabric.Workers.Reporting;
using Microsoft.Extensions.Logging;

namespace KvFabric.Workers.Driver;

public sealed record DemoOptions
{
    public int Requests { get; init; } = 24;
    public int PromptTokens { get; init; } = 1024;
    public double SharedFraction { get; init; } = 0.9;
    public int Conversations { get; init; } = 4;
    public int MaxNewTokens { get; init; } = 24;
    /// <summary>Requests per second (Poisson arrivals).</summary>
    public double Rate { get; init; } = 4;
    public int MaxInFlight { get; init; } = 4;
    /// <summary>Arrival times (a trace's, or the synthetic Poisson ones) are multiplied by this.</summary>
    public double TimeScale { get; init; } = 1.0;
    /// <summary>A Mooncake-format trace to replay instead of synthetic chats.</summary>
    public string? Trace { get; init; }
    public string Model { get; init; } = "small";
    public int PrefillWorkers { get; init; } = 2;
    public int DecodeWorkers { get; init; } = 1;
    public string OutputDirectory { get; init; } = "demo-out";
    public ulong Seed { get; init; } = 7;
    /// <summary>Hand-off backend of every worker: auto, tcp, shm or ucx.</summary>
    public string Transfer { get; init; } = "auto";
}

/// <summary>
/// The main job: a single-machine deployment (in-process sidecars on an in-process cluster store, prefill and decode
/// workers as processes), a workload replayed with prefix reuse and without, every output checked against a monolithic
/// run, and a summary (console, JSON, and an SVG of TTFT with and without reuse).
/// </summary>
public static class Demo
{
    public static async Task<int> RunAsync(DemoOptions options, TextWriter output, CancellationToken cancellationToken)
    {
        var config = Serving.ModelConfigs.Get(options.Model);
        IReadOnlyList<WorkloadRequest> workload = options.Trace is null
            ? Workloads.SharedPrefixChats(options.Requests, options.PromptTokens, options.SharedFraction, options.Conversations, options.MaxNewTokens,
                config.Vocab, options.Rate, options.Seed)
            : Workloads.FromTrace(ReplayTrace.Load(options.Trace, 512), new WorkloadScale(MaxPromptTokens: options.PromptTokens, MaxNewTokens: options.MaxNewTokens),
                config.Vocab, options.Requests);
        Directory.CreateDirectory(options.OutputDirectory);
        string ssd = Path.Combine(Path.GetTempPath(), $"kvfabric-demo-{Environment.ProcessId}");
        output.WriteLine($"kvfabric demo: {workload.Count} requests ({(options.Trace is null ? $"chats over a {options.SharedFraction:P0}-shared prefix" : Path.GetFileName(options.Trace))}), " +
            $"prompts up to {workload.Max(r => r.Prompt.Length)} tokens, {options.MaxNewTokens} new tokens each; model '{options.Model}' " +
            $"({config.Layers} layers, d={config.DModel}, {config.ToKvLayout().BlockBytes / 1024} KiB blocks of {config.TokensPerBlock} tokens)");
        output.WriteLine($"starting {options.PrefillWorkers} prefill and {options.DecodeWorkers} decode worker processes, {options.PrefillWorkers} sidecars (in-process cluster store) ...");
        using ILoggerFactory logs = LoggerFactory.Create(b => b.AddFilter(_ => false));
        try
        {
            await using Deployment d = await Deployment.StartAsync(new DeploymentOptions
            {
                PrefillWorkers = options.PrefillWorkers, DecodeWorkers = options.DecodeWorkers, Model = options.Model, SsdDirectory = ssd, Logs = logs,
                // Small memory tiers, so the hit rate by tier shows blocks demoted to host DRAM and SSD being reused.
                GpuBlocks = 64, HostBlocks = 128, Transfer = options.Transfer,
            }, cancellationToken).ConfigureAwait(false);
            output.WriteLine($"placement: {d.Placement}; GPU tier emulated in host memory (no GPU is used)");
            var router = new Router(d.Prefill, d.Decode, d.IndexClient, config.ToKvLayout(), "dev");

            // Warm-up (JIT, connections) on prompts no request shares.
            IReadOnlyList<WorkloadRequest> warm = Workloads.SharedPrefixChats(4, 256, 0.5, 4, 4, config.Vocab, 100, options.Seed + 1000);
            await RequestDriver.RunDisaggregatedAsync(router, warm, new DriverOptions { TimeScale = 0, Label = "warm-up" }, cancellationToken).ConfigureAwait(false);

            var reuse = await RequestDriver.RunDisaggregatedAsync(router, workload,
                new DriverOptions { MaxInFlight = options.MaxInFlight, TimeScale = options.TimeScale, Label = "with prefix reuse", Progress = output }, cancellationToken).ConfigureAwait(false);
            var noReuse = await RequestDriver.RunDisaggregatedAsync(router, workload,
                new DriverOptions { MaxInFlight = options.MaxInFlight, TimeScale = options.TimeScale, NoReuse = true, Label = "without reuse", Progress = output }, cancellationToken).ConfigureAwait(false);

            output.WriteLine("checking every output against a monolithic run (same model in one process, no fabric) ...");
            Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, config);
            var mismatches = new List<string>();
            int equal = MonolithicCheck.Compare(reuse, reference, mismatches) + MonolithicCheck.Compare(noReuse, reference, mismatches);
            bool match = mismatches.Count == 0 && equal == 2 * workload.Count;

            RunSummary a = RunSummary.Of("with prefix reuse", reuse, config.TokensPerBlock);
            RunSummary b = RunSummary.Of("without reuse", noReuse, config.TokensPerBlock);
            JsonObject bytes = await TransferTotals.OfAsync(d.Prefill.Concat(d.Decode)).ConfigureAwait(false);
            long fabricTcp = d.Sidecars.Sum(s => s.Agent.Stats.TcpBytesSent), fabricShm = d.Sidecars.Sum(s => s.Agent.Stats.ShmBytesWritten + s.Agent.Stats.ShmBytesRead);

            output.WriteLine();
            output.WriteLine(a.Line());
            output.WriteLine(b.Line());
            output.WriteLine(string.Create(CultureInfo.InvariantCulture,
                $"prefix reuse cuts median TTFT {b.TtftP50 / Math.Max(a.TtftP50, 1e-9):0.0}x; KV hand-off (prefill -> decode): tcp {bytes["tcp"]} B, shm {bytes["shm"]} B, ucx {bytes["ucx"]} B; " +
                $"between sidecars: tcp {fabricTcp} B, shm {fabricShm} B; hand-off retries {bytes["handoff_retries"]}"));
            output.WriteLine(match
                ? $"outputs: all {equal} matched the monolithic run"
                : $"outputs: {mismatches.Count} did NOT match the monolithic run: {string.Join("; ", mismatches.Take(5))}");

            var json = new JsonObject
            {
                ["requests"] = workload.Count, ["outputs_match"] = match, ["mismatches"] = new JsonArray([.. mismatches.Take(20).Select(m => JsonValue.Create(m))]),
                ["model"] = options.Model, ["placement"] = d.Placement,
                ["with_reuse"] = a.ToJson(), ["without_reuse"] = b.ToJson(),
                ["ttft_p50_speedup"] = Math.Round(b.TtftP50 / Math.Max(a.TtftP50, 1e-9), 3),
                ["handoff_bytes_by_backend"] = bytes,
                ["sidecar_transfer_bytes"] = new JsonObject { ["tcp"] = fabricTcp, ["shm"] = fabricShm },
            };
            string jsonPath = Path.Combine(options.OutputDirectory, "summary.json");
            await File.WriteAllTextAsync(jsonPath, json.ToJsonString(new JsonSerializerOptions { WriteIndented = true }), cancellationToken).ConfigureAwait(false);
            await File.WriteAllLinesAsync(Path.Combine(options.OutputDirectory, "requests.jsonl"),
                reuse.Select(r => Detail("with_reuse", r)).Concat(noReuse.Select(r => Detail("without_reuse", r))), cancellationToken).ConfigureAwait(false);
            string svgPath = Path.Combine(options.OutputDirectory, "ttft.svg");
            await File.WriteAllTextAsync(svgPath, TtftChart(reuse, noReuse), cancellationToken).ConfigureAwait(false);
            output.WriteLine($"wrote {jsonPath} and {svgPath}");
            return match ? 0 : 1;
        }
        finally
        {
            if (Directory.Exists(ssd))
                Directory.Delete(ssd, recursive: true);
        }
    }

    /// <summary>One request as a JSON line: its latencies and where its prefill's time went.</summary>
    public static string Detail(string run, RequestResult r) => new JsonObject
    {
        ["run"] = run, ["id"] = r.Id, ["ok"] = r.Ok, ["error"] = r.Error, ["ttft_ms"] = Math.Round(r.TtftMs, 3), ["e2e_ms"] = Math.Round(r.E2eMs, 3),
        ["itl_ms_max"] = r.ItlMs.Length == 0 ? 0 : Math.Round(r.ItlMs.Max(), 3), ["prefill_worker"] = r.PrefillWorker, ["decode_worker"] = r.DecodeWorker,
        ["attempts"] = r.Attempts,
        ["prefill"] = r.Prefill is null ? null : JsonNode.Parse(Google.Protobuf.JsonFormatter.Default.Format(r.Prefill)),
    }.ToJsonString();

    /// <summary>TTFT of each request in arrival order, with and without prefix reuse.</summary>
    public static string TtftChart(IReadOnlyList<RequestResult> reuse, IReadOnlyList<RequestResult> noReuse) => SvgChart.Line(
        "Time to first token, with and without prefix reuse", "request (arrival order)", "TTFT (ms)",
        [
            new Series("without reuse", [.. noReuse.Where(r => r.Ok).Select(r => ((double)r.Id + 1, r.TtftMs))]),
            new Series("with prefix reuse", [.. reuse.Where(r => r.Ok).Select(r => ((double)r.Id + 1, r.TtftMs))]),
        ], logX: false, logY: true);

}
