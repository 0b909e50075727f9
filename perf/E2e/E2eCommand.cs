using System.CommandLine;
using System.Text.Json.Nodes;
using KvFabric.Bench.Reporting;
using KvFabric.Workers.Driver;
using KvFabric.Workers.Serving;
using Microsoft.Extensions.Logging;
using Spectre.Console;

namespace KvFabric.Bench.E2e;

// `kvfabric-bench e2e`: the workers end to end on one machine (src/Workers/Driver/Deployment.cs: in-process sidecars,
// worker processes, decode pinned to its own CPU). Three measurements, each against its reference from the same run:
//  - TTFT with prefix reuse against the same requests without reuse (90%-shared prefixes, one request at a time, so
//    TTFT is service time, not queueing);
//  - the KV hand-off's share of TTFT (per request, median);
//  - decode inter-token latency p99 while prefills run on the prefill workers, against decode with no prefill beside
//    it (every request prefilled first, then all decoded), and against a colocated worker (prefill and decode in one
//    process) under the same load, which shows the interference disaggregation removes.
// Every output of every run is compared with a monolithic run of the same model (outputs_match).
public static class E2eCommand
{
    public static Command Create()
    {
        var model = new Option<string>("--model") { Description = "tiny, small or default", DefaultValueFactory = _ => "default" };
        var requests = new Option<int>("--requests") { Description = "requests of the TTFT runs", DefaultValueFactory = _ => 16 };
        var prompt = new Option<int>("--prompt-tokens") { Description = "prompt length of the TTFT runs", DefaultValueFactory = _ => 1024 };
        var itlRequests = new Option<int>("--itl-requests") { Description = "requests of the ITL runs (twice the decode batch keeps it full)", DefaultValueFactory = _ => 16 };
        var itlPrompt = new Option<int>("--itl-prompt-tokens") { DefaultValueFactory = _ => 512 };
        var itlNew = new Option<int>("--itl-new-tokens") { DefaultValueFactory = _ => 64 };
        var batch = new Option<int>("--max-batch") { DefaultValueFactory = _ => 8 };
        var sloTtft = new Option<double>("--slo-ttft-ms") { Description = "goodput counts requests whose TTFT is at most this ...", DefaultValueFactory = _ => 500 };
        var sloItl = new Option<double>("--slo-itl-ms") { Description = "... and whose every inter-token gap is at most this", DefaultValueFactory = _ => 25 };
        var itlRate = new Option<double>("--itl-rate") { Description = "arrivals per second of the ITL runs (Poisson): new prefills keep landing while earlier requests decode", DefaultValueFactory = _ => 16 };
        var quick = new Option<bool>("--quick") { Description = "CI-sized: the small model, 6 requests of 256 tokens, 8 ITL requests" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("e2e", "Workers end to end: TTFT with/without prefix reuse, hand-off share of TTFT, decode ITL disaggregated vs alone vs colocated.")
        {
            model, requests, prompt, itlRequests, itlPrompt, itlNew, batch, itlRate, sloTtft, sloItl, quick, json,
        };
        cmd.SetAction(async (p, ct) =>
        {
            bool q = p.GetValue(quick);
            JsonObject result = await RunAsync(QuickDefaults.Pick(p, model, q, "small"), QuickDefaults.Pick(p, requests, q, 6), QuickDefaults.Pick(p, prompt, q, 256),
                QuickDefaults.Pick(p, itlRequests, q, 8), QuickDefaults.Pick(p, itlPrompt, q, 128), QuickDefaults.Pick(p, itlNew, q, 24),
                QuickDefaults.Pick(p, batch, q, 4), QuickDefaults.Pick(p, itlRate, q, 20.0), new Slo(p.GetValue(sloTtft), p.GetValue(sloItl)), ct);
            JsonReport.Write(p.GetValue(json), result);
            return result["outputs_match"]!.GetValue<bool>() ? 0 : 1;
        });
        return cmd;
    }

    private static async Task<JsonObject> RunAsync(string model, int requests, int promptTokens, int itlRequests, int itlPrompt, int itlNew, int maxBatch,
        double itlRate, Slo slo, CancellationToken ct)
    {
        JsonObject report = null!;
        await AnsiConsole.Status().StartAsync("e2e", async ctx =>
        {
            using var status = new StatusWriter(ctx);
            report = await MeasureAsync(model, requests, promptTokens, itlRequests, itlPrompt, itlNew, maxBatch, itlRate, slo, status, ct);
        });
        var table = new Table().AddColumns("figure", "value");
        foreach (string key in new[] { "outputs_match", "requests", "ttft_p50_ms_reuse", "ttft_p50_ms_no_reuse", "ttft_reuse_speedup", "handoff_fraction_of_ttft",
                     "itl_p99_ms_decode_alone", "itl_p99_ms_decode_alone_paced", "itl_p99_ms_disagg", "itl_p99_ms_colocated" })
            table.AddRow(key, Markup.Escape(report[key]!.ToJsonString()));
        table.AddRow("goodput (disaggregated / colocated)", Markup.Escape($"{report["goodput_disagg"]!["met_slo"]} / {report["goodput_colocated"]!["met_slo"]} of {report["goodput_disagg"]!["requests"]}"));
        AnsiConsole.Write(new Rule($"e2e: model {model}"));
        AnsiConsole.Write(table);
        return report;
    }

    /// <summary>Progress lines of the driver, shown as the status line.</summary>
    private sealed class StatusWriter(StatusContext ctx) : TextWriter
    {
        public override System.Text.Encoding Encoding => System.Text.Encoding.UTF8;
        public override void WriteLine(string? value) => ctx.Status(Markup.Escape(value ?? string.Empty));
    }

    private static async Task<JsonObject> MeasureAsync(string model, int requests, int promptTokens, int itlRequests, int itlPrompt, int itlNew, int maxBatch,
        double itlRate, Slo slo, TextWriter status, CancellationToken ct)
    {
        var config = ModelConfigs.Get(model);
        using ILoggerFactory logs = LoggerFactory.Create(b => b.AddFilter(_ => false));
        IReadOnlyList<WorkloadRequest> ttftLoad = Workloads.SharedPrefixChats(requests, promptTokens, 0.9, 4, 8, config.Vocab, 100, 11);
        IReadOnlyList<WorkloadRequest> itlLoad = Workloads.SharedPrefixChats(itlRequests, itlPrompt, 0.5, itlRequests, itlNew, config.Vocab, itlRate, 12);
        // Warm-up (connections, first allocations) on prompts no measured request shares.
        IReadOnlyList<WorkloadRequest> warm = Workloads.SharedPrefixChats(4, Math.Min(256, promptTokens), 0.5, 4, 4, config.Vocab, 100, 13);
        var mismatches = new List<string>();
        int compared = 0;
        status.WriteLine($"model {model}: computing the monolithic reference of {ttftLoad.Count + itlLoad.Count} requests");
        Dictionary<int, int[]> ttftRef = MonolithicCheck.Reference(ttftLoad, config);
        Dictionary<int, int[]> itlRef = MonolithicCheck.Reference(itlLoad, config);

        RunSummary reuse, noReuse, disagg, alone, alonePaced, colocated;
        JsonObject goodputDisagg, goodputColocated;
        JsonObject bytes;
        string placement;
        await using (Deployment d = await Deployment.StartAsync(new DeploymentOptions { Model = model, PrefillWorkers = 2, DecodeWorkers = 1, MaxBatch = maxBatch, Logs = logs }, ct))
        {
            placement = d.Placement;
            var router = new Router(d.Prefill, d.Decode, d.IndexClient, config.ToKvLayout(), "dev");
            await RequestDriver.RunDisaggregatedAsync(router, warm, new DriverOptions { TimeScale = 0 }, ct);

            // TTFT: one request at a time (service time), first with reuse on a cold fabric, then the same requests without.
            var serial = new DriverOptions { MaxInFlight = 1, TimeScale = 0, Label = "ttft reuse", Progress = status };
            RequestResult[] a = await RequestDriver.RunDisaggregatedAsync(router, ttftLoad, serial, ct);
            RequestResult[] b = await RequestDriver.RunDisaggregatedAsync(router, ttftLoad, serial with { NoReuse = true, Label = "ttft no reuse" }, ct);
            compared += MonolithicCheck.Compare(a, ttftRef, mismatches) + MonolithicCheck.Compare(b, ttftRef, mismatches);
            reuse = RunSummary.Of("disaggregated, reuse", a, config.TokensPerBlock);
            noReuse = RunSummary.Of("disaggregated, no reuse", b, config.TokensPerBlock);

            // ITL: decode alone (everything prefilled first), then with prefills running beside it (no reuse: the most prefill work).
            status.WriteLine("decode alone: prefilling every request first");
            RequestResult[] c = await RequestDriver.RunDisaggregatedAsync(router, itlLoad,
                new DriverOptions { PrefillFirst = true, NoReuse = true, TimeScale = 0, Label = "decode alone" }, ct);
            var wall = System.Diagnostics.Stopwatch.StartNew();
            RequestResult[] e = await RequestDriver.RunDisaggregatedAsync(router, itlLoad,
                new DriverOptions { MaxInFlight = maxBatch, NoReuse = true, Label = "disaggregated under load", Progress = status }, ct);
            goodputDisagg = slo.Goodput(e, wall.Elapsed);
            // Decode alone at equal batch sizes: prefill everything first again, then start each decode when its first
            // token came in the run under load (arrival + TTFT), so the decode batch grows and shrinks as it did there.
            var arrivals = itlLoad.ToDictionary(r => r.Id, r => (double)r.ArrivalMs);
            double first = e.Where(r => r.Ok).Select(r => arrivals[r.Id] + r.TtftMs).DefaultIfEmpty(0).Min();
            var starts = e.Where(r => r.Ok).ToDictionary(r => r.Id, r => arrivals[r.Id] + r.TtftMs - first);
            status.WriteLine("decode alone, paced as the run under load: prefilling every request first");
            RequestResult[] g = await RequestDriver.RunDisaggregatedAsync(router, itlLoad,
                new DriverOptions { PrefillFirst = true, NoReuse = true, TimeScale = 0, DecodeStartMs = starts, Label = "decode alone, paced" }, ct);
            compared += MonolithicCheck.Compare(c, itlRef, mismatches) + MonolithicCheck.Compare(e, itlRef, mismatches) + MonolithicCheck.Compare(g, itlRef, mismatches);
            alone = RunSummary.Of("decode alone", c, config.TokensPerBlock);
            disagg = RunSummary.Of("disaggregated", e, config.TokensPerBlock);
            alonePaced = RunSummary.Of("decode alone, paced", g, config.TokensPerBlock);
            bytes = await TransferTotals.OfAsync(d.Prefill.Concat(d.Decode));
            // Requests the prefill workers served without the fabric (sidecar down, overloaded, refusing): say why.
            foreach (WorkerClient w in d.Prefill)
            {
                foreach (string line in d.ProcessOf(w.Name).Log.Split('\n').Where(l => l.Contains("without the fabric", StringComparison.Ordinal) || l.Contains("could not be offloaded", StringComparison.Ordinal)).Take(5))
                    Console.Error.WriteLine($"{w.Name}: {line.Trim()}");
            }
        }

        await using (Deployment d = await Deployment.StartAsync(new DeploymentOptions { Model = model, ColocatedWorkers = 1, MaxBatch = maxBatch, Logs = logs }, ct))
        {
            await RequestDriver.RunColocatedAsync(d.Colocated, warm, new DriverOptions { TimeScale = 0 }, ct);
            var wall = System.Diagnostics.Stopwatch.StartNew();
            RequestResult[] f = await RequestDriver.RunColocatedAsync(d.Colocated, itlLoad,
                new DriverOptions { MaxInFlight = maxBatch, NoReuse = true, Label = "colocated under load", Progress = status }, ct);
            goodputColocated = slo.Goodput(f, wall.Elapsed);
            compared += MonolithicCheck.Compare(f, itlRef, mismatches);
            colocated = RunSummary.Of("colocated", f, config.TokensPerBlock);
        }

        foreach (RunSummary s in new[] { reuse, noReuse, alone, alonePaced, disagg, colocated })
            Console.Error.WriteLine(s.Line());
        int total = 2 * ttftLoad.Count + 4 * itlLoad.Count;
        JsonObject report = JsonReport.Header("e2e");
        report["model"] = model;
        report["placement"] = placement;
        report["requests"] = total;
        report["outputs_compared_equal"] = compared;
        report["outputs_match"] = mismatches.Count == 0 && compared == total;
        report["mismatches"] = new JsonArray([.. mismatches.Take(20).Select(m => JsonValue.Create(m))]);
        report["ttft_p50_ms_reuse"] = JsonReport.Round(reuse.TtftP50);
        report["ttft_p50_ms_no_reuse"] = JsonReport.Round(noReuse.TtftP50);
        report["ttft_reuse_speedup"] = JsonReport.Round(noReuse.TtftP50 / Math.Max(reuse.TtftP50, 1e-9));
        report["handoff_fraction_of_ttft"] = JsonReport.Round(reuse.HandoffFractionOfTtft);
        report["handoff_fraction_of_ttft_no_reuse"] = JsonReport.Round(noReuse.HandoffFractionOfTtft);
        report["itl_p99_ms_disagg"] = JsonReport.Round(disagg.ItlP99);
        report["itl_p99_ms_decode_alone"] = JsonReport.Round(alone.ItlP99);
        report["itl_p99_ms_colocated"] = JsonReport.Round(colocated.ItlP99);
        report["itl_p99_disagg_vs_alone"] = JsonReport.Round(disagg.ItlP99 / Math.Max(alone.ItlP99, 1e-9));
        report["itl_p99_ms_decode_alone_paced"] = JsonReport.Round(alonePaced.ItlP99);
        report["itl_p99_disagg_vs_alone_paced"] = JsonReport.Round(disagg.ItlP99 / Math.Max(alonePaced.ItlP99, 1e-9));
        report["itl_p99_colocated_vs_alone"] = JsonReport.Round(colocated.ItlP99 / Math.Max(alone.ItlP99, 1e-9));
        report["ttft_p50_ms_disagg_under_load"] = JsonReport.Round(disagg.TtftP50);
        report["ttft_p50_ms_colocated_under_load"] = JsonReport.Round(colocated.TtftP50);
        report["handoff_bytes_by_backend"] = bytes;
        report["slo"] = new JsonObject { ["ttft_ms"] = slo.TtftMs, ["itl_ms"] = slo.ItlMs };
        report["goodput_disagg"] = goodputDisagg;
        report["goodput_colocated"] = goodputColocated;
        report["runs"] = new JsonArray(reuse.ToJson(), noReuse.ToJson(), alone.ToJson(), alonePaced.ToJson(), disagg.ToJson(), colocated.ToJson());
        return report;
    }
}

/// <summary>A latency target: goodput counts the requests that met it (TTFT, and every inter-token gap), per second of the run.</summary>
internal sealed record Slo(double TtftMs, double ItlMs)
{
    public JsonObject Goodput(IReadOnlyList<RequestResult> results, TimeSpan wall)
    {
        int met = results.Count(r => r.Ok && r.TtftMs <= TtftMs && r.ItlMs.All(g => g <= ItlMs));
        return new JsonObject
        {
            ["requests"] = results.Count, ["met_slo"] = met, ["fraction"] = JsonReport.Round((double)met / Math.Max(1, results.Count)),
            ["requests_per_second"] = JsonReport.Round(met / Math.Max(wall.TotalSeconds, 1e-9)),
        };
    }
}
