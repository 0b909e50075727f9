using System.CommandLine;
using System.Globalization;
using System.Text.Json.Nodes;
using KvFabric.Bench.Reporting;
using KvFabric.Routing;
using KvFabric.Tiers;
using KvFabric.Tiers.Replay;
using Spectre.Console;

namespace KvFabric.Bench.Route;

/// <summary>
/// `kvfabric-bench route`: replays a request trace over W simulated workers, each with its own fixed-capacity cache, and
/// compares routing policies on the same trace: KV-aware (RouteCost at temperature 0 over every worker's matched
/// prefix and load), the same without load, round-robin and seeded random; next to one cache of W×C blocks.
/// The model is documented on RoutedReplay.
/// </summary>
public static class RouteCommand
{
    public static readonly RoutePolicy[] Policies = [RoutePolicy.KvAware, RoutePolicy.KvOverlap, RoutePolicy.RoundRobin, RoutePolicy.Random];

    public sealed record Options
    {
        public required string TracePath { get; init; }
        public int TokensPerBlock { get; init; } = 512;
        public required RoutedReplayOptions Cluster { get; init; }
    }

    public static Command Create()
    {
        var trace = new Option<string>("--trace") { Description = "Mooncake-format JSONL trace (timestamp, input_length, output_length, hash_ids)", Required = true };
        var tpb = new Option<int>("--tokens-per-block") { Description = "tokens per block of the trace's hash_ids", DefaultValueFactory = _ => 512 };
        var workers = new Option<int>("--workers") { Description = "simulated prefill workers", DefaultValueFactory = _ => 4 };
        var capacity = new Option<string>("--capacity-blocks") { Description = "blocks per worker: one count for every tier, or one per tier of --tiers (e.g. 500,2000)", DefaultValueFactory = _ => "2000" };
        var tiers = new Option<string>("--tiers") { Description = "each worker's tiers, fastest first: gpu, host, ssd (comma-separated)", DefaultValueFactory = _ => "host" };
        var policy = new Option<string>("--policy") { Description = "eviction policy of every tier: lru or cost", DefaultValueFactory = _ => "lru" };
        var prefill = new Option<double>("--prefill-tokens-per-second") { Description = "one worker's prefill throughput (the load model)", DefaultValueFactory = _ => 16_000 };
        var decode = new Option<double>("--decode-ms-per-token") { Description = "occupancy per output token (0: disaggregated prefill workers)", DefaultValueFactory = _ => 0 };
        var seed = new Option<ulong>("--seed") { Description = "seed of the random policy", DefaultValueFactory = _ => 42 };
        var requests = new Option<int?>("--requests") { Description = "replay only the first N requests" };
        var quick = new Option<bool>("--quick") { Description = $"CI-sized run: the first {Replay.ReplayCommand.QuickRequests} requests" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("route", "KV-aware routing against round-robin and random over W simulated workers' caches, on a request trace.")
        {
            trace, tpb, workers, capacity, tiers, policy, prefill, decode, seed, requests, quick, json,
        };
        cmd.SetAction(p =>
        {
            TierKind[] kinds = ParseTiers(p.GetValue(tiers)!);
            int max = p.GetValue(requests) ?? (p.GetValue(quick) ? Replay.ReplayCommand.QuickRequests : int.MaxValue);
            var o = new Options
            {
                TracePath = p.GetValue(trace)!,
                TokensPerBlock = p.GetValue(tpb),
                Cluster = new RoutedReplayOptions
                {
                    Workers = p.GetValue(workers),
                    Tiers = kinds,
                    CapacityBlocks = ParseCapacity(p.GetValue(capacity)!, kinds.Length),
                    EvictionPolicy = p.GetValue(policy) is "lru" or "cost" ? p.GetValue(policy)! : throw new ArgumentException($"--policy {p.GetValue(policy)}: use lru or cost"),
                    PrefillTokensPerSecond = p.GetValue(prefill),
                    DecodeMsPerToken = p.GetValue(decode),
                    Seed = p.GetValue(seed),
                    MaxRequests = max,
                },
            };
            JsonReport.Write(p.GetValue(json), Run(o));
            return 0;
        });
        return cmd;
    }

    public static TierKind[] ParseTiers(string text) =>
        [.. text.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries).Select(t => t.ToLowerInvariant() switch
        {
            "gpu" => TierKind.Gpu,
            "host" or "dram" => TierKind.Host,
            "ssd" => TierKind.Ssd,
            _ => throw new ArgumentException($"--tiers {text}: '{t}' is not gpu, host or ssd"),
        })];

    public static int[] ParseCapacity(string text, int tiers)
    {
        var parts = text.Split(',', StringSplitOptions.TrimEntries);
        if (parts.Length != 1 && parts.Length != tiers)
            throw new ArgumentException($"--capacity-blocks {text}: give one count for every tier or one per tier ({tiers})");
        var caps = new int[tiers];
        for (int i = 0; i < tiers; i++)
        {
            string part = parts[parts.Length == 1 ? 0 : i];
            if (!int.TryParse(part, NumberStyles.None, CultureInfo.InvariantCulture, out caps[i]) || caps[i] < 1)
                throw new ArgumentException($"--capacity-blocks {text}: '{part}' is not a positive block count");
        }
        return caps;
    }

    public static JsonObject Run(Options o)
    {
        ReplayTrace trace = null!;
        var results = new List<RoutedReplayResult>();
        RoutedReplayResult single = null!, infinite = null!;
        RoutedReplayOptions c = o.Cluster;
        AnsiConsole.Status().Start("route", ctx =>
        {
            ctx.Status($"loading {o.TracePath}");
            trace = ReplayTrace.Load(o.TracePath, o.TokensPerBlock, c.MaxRequests);
            foreach (RoutePolicy policy in Policies)
            {
                ctx.Status($"replaying {trace.Count} requests over {c.Workers} workers: {RoutedReplay.NameOf(policy)}");
                results.Add(RoutedReplay.Run(trace, c, policy));
            }
            ctx.Status($"reference: one cache of {c.Workers}x the blocks");
            single = RoutedReplay.Run(trace, c with { Workers = 1, CapacityBlocks = [.. c.CapacityBlocks.Select(b => checked(b * c.Workers))] },
                RoutePolicy.KvAware, "single-cache");
            ctx.Status("reference: infinite cache");
            infinite = RoutedReplay.Run(trace, c with { Workers = 1, Tiers = [TierKind.Host], CapacityBlocks = [Math.Max(1, trace.DistinctBlocks)] },
                RoutePolicy.KvAware, "infinite");
        });
        return Report(o, trace, results, single, infinite);
    }

    private static JsonObject Report(Options o, ReplayTrace trace, List<RoutedReplayResult> results, RoutedReplayResult single, RoutedReplayResult infinite)
    {
        RoutedReplayOptions c = o.Cluster;
        var report = JsonReport.Header("route");
        report["trace"] = Path.GetFileName(o.TracePath);
        report["workers"] = c.Workers;
        report["capacity_blocks"] = c.CapacityBlocks.Count == 1 ? c.CapacityBlocks[0] : new JsonArray([.. c.CapacityBlocks.Select(b => (JsonNode)b)]);
        report["tiers"] = new JsonArray([.. c.Tiers.Select(k => (JsonNode)k.ToString().ToLowerInvariant())]);
        report["eviction_policy"] = c.EvictionPolicy;
        report["requests"] = results[0].Requests;
        report["input_tokens"] = results[0].InputTokens;
        report["tokens_per_block"] = o.TokensPerBlock;
        report["distinct_blocks"] = trace.DistinctBlocks;
        report["load_model"] = new JsonObject
        {
            ["prefill_tokens_per_second"] = c.PrefillTokensPerSecond,
            ["decode_ms_per_token"] = c.DecodeMsPerToken,
            ["offered_utilization_without_hits"] = JsonReport.Round(OfferedUtilization(trace, c, results[0].InputTokens)),
        };
        report["seed"] = c.Seed;

        var policies = new JsonObject();
        foreach (var r in results)
        {
            var perTier = new JsonObject();
            for (int t = 0; t < r.Tiers.Count; t++)
                perTier[r.Tiers[t].ToString().ToLowerInvariant()] = JsonReport.Round((double)r.HitTokensByTier[t] / r.InputTokens);
            policies[r.Name] = new JsonObject
            {
                ["token_hit_rate"] = JsonReport.Round(r.TokenHitRate),
                ["block_hit_rate"] = JsonReport.Round(r.BlockHitRate),
                ["token_hit_rate_by_tier"] = perTier,
                ["requests_per_worker"] = new JsonArray([.. r.RequestsPerWorker.Select(n => (JsonNode)n)]),
                ["max_over_mean_load"] = JsonReport.Round(r.MaxOverMeanRequests),
                ["max_over_mean_busy"] = JsonReport.Round(r.MaxOverMeanBusy),
                ["expected_hit_blocks"] = r.ExpectedHitBlocks,
                ["actual_hit_blocks"] = r.ActualHitBlocks,
                ["expected_actual_mismatches"] = r.ExpectedActualMismatches,
                ["expected_actual_agreement"] = JsonReport.Round(1 - (double)r.ExpectedActualMismatches / Math.Max(1, r.Requests)),
                ["ttft_ms"] = new JsonObject
                {
                    ["mean"] = JsonReport.Round(r.MeanTtftMs),
                    ["p50"] = JsonReport.Round(r.TtftPercentileMs(50)),
                    ["p99"] = JsonReport.Round(r.TtftPercentileMs(99)),
                },
                ["replay_seconds"] = JsonReport.Round(r.Seconds),
            };
        }
        report["policies"] = policies;
        report["single_cache"] = new JsonObject
        {
            ["capacity_blocks"] = new JsonArray([.. c.CapacityBlocks.Select(b => (JsonNode)(b * c.Workers))]),
            ["token_hit_rate"] = JsonReport.Round(single.TokenHitRate),
            ["block_hit_rate"] = JsonReport.Round(single.BlockHitRate),
        };
        report["infinite_cache"] = new JsonObject
        {
            ["token_hit_rate"] = JsonReport.Round(infinite.TokenHitRate),
            ["block_hit_rate"] = JsonReport.Round(infinite.BlockHitRate),
        };

        var table = new Table().AddColumns("routing", "token hit rate", "block hit rate", "requests per worker", "max/mean", "expected = actual", "TTFT mean / p99 (sim.)");
        foreach (var r in results)
        {
            table.AddRow(r.Name, $"{r.TokenHitRate:P2}", $"{r.BlockHitRate:P2}", string.Join(" ", r.RequestsPerWorker), $"{r.MaxOverMeanRequests:F2}",
                $"{r.Requests - r.ExpectedActualMismatches}/{r.Requests}", $"{r.MeanTtftMs / 1000:F2} s / {r.TtftPercentileMs(99) / 1000:F2} s");
        }
        table.AddRow($"single cache ({string.Join(",", c.CapacityBlocks.Select(b => b * c.Workers))} blocks)", $"{single.TokenHitRate:P2}", $"{single.BlockHitRate:P2}", "", "", "", "");
        table.AddRow("infinite cache", $"{infinite.TokenHitRate:P2}", $"{infinite.BlockHitRate:P2}", "", "", "", "");
        AnsiConsole.Write(new Rule($"route: {Path.GetFileName(o.TracePath)}, {c.Workers} workers x {string.Join(",", c.CapacityBlocks)} blocks ({string.Join(",", c.Tiers)}, {c.EvictionPolicy})"));
        AnsiConsole.Write(table);
        return report;
    }

    // Share of the cluster's prefill capacity the trace's input tokens would take if nothing hit.
    private static double OfferedUtilization(ReplayTrace trace, RoutedReplayOptions c, long inputTokens)
    {
        int n = Math.Min(c.MaxRequests, trace.Count);
        if (n == 0)
            return 0;
        double spanS = Math.Max(1, trace[n - 1].TimestampMs - trace[0].TimestampMs) / 1000.0;
        return inputTokens / c.PrefillTokensPerSecond / c.Workers / spanS;
    }
}
