using System.CommandLine;
using System.Diagnostics;
using System.Globalization;
using System.Text.Json.Nodes;
using KvFabric.Bench.Reporting;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;
using Spectre.Console;

namespace KvFabric.Bench.Replay;

/// <summary>
/// `kvfabric-bench replay`: token hit rate of an eviction policy on a request trace, under prefix semantics, next to
/// LRU, Belady's MIN with bypass and an infinite cache replayed over the same requests.
/// </summary>
public static class ReplayCommand
{
    public const int QuickRequests = 2000;

    public sealed record Options
    {
        public required string TracePath { get; init; }
        public int TokensPerBlock { get; init; } = 512;
        public required int[] CapacityBlocks { get; init; }
        public string Policy { get; init; } = "cost";
        public string? SsdPolicy { get; init; }
        public int BlockBytes { get; init; } = 64 << 20;
        public int MaxRequests { get; init; } = int.MaxValue;
        public bool MicroBench { get; init; } = true;
        /// <summary>tier-manager: the real TierManager over key-only stores; simulator: PolicySimulatorCache.</summary>
        public string Engine { get; init; } = "tier-manager";
        /// <summary>An experiment: first sightings are admitted only if listed in this file (FirstSightingDoor).</summary>
        public string? FirstSightingDoor { get; init; }
    }

    public static Command Create()
    {
        var trace = new Option<string>("--trace") { Description = "Mooncake-format JSONL trace (timestamp, input_length, output_length, hash_ids)", Required = true };
        var tpb = new Option<int>("--tokens-per-block") { Description = "tokens per block of the trace's hash_ids", DefaultValueFactory = _ => 512 };
        var capacity = new Option<string>("--capacity-blocks") { Description = "N (one DRAM tier) or G,D,S (GPU, DRAM, SSD tiers), in blocks", DefaultValueFactory = _ => "4000" };
        var policy = new Option<string>("--policy") { Description = $"eviction policy of the hierarchy ({PolicyFactory.Names}; with three tiers a cost policy ranks the middle one by recency), or one per tier, fastest first: G,D,S", DefaultValueFactory = _ => "cost" };
        var ssdPolicy = new Option<string?>("--ssd-policy") { Description = "the SSD tier's policy when it differs (e.g. cost+seen-twice)" };
        var blockBytes = new Option<string>("--block-bytes") { Description = "bytes per block, for bytes moved (default: Llama-3-8B bf16, 128 KiB/token x 512)", DefaultValueFactory = _ => "64MiB" };
        var requests = new Option<int?>("--requests") { Description = "replay only the first N requests" };
        var noMicro = new Option<bool>("--no-microbench") { Description = "skip the policy ops/s micro-benchmark" };
        var quick = new Option<bool>("--quick") { Description = $"CI-sized run: the first {QuickRequests} requests" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var engine = new Option<string>("--engine") { Description = "tier-manager (the real TierManager, default) or simulator (the block-count simulator)", DefaultValueFactory = _ => "tier-manager" };
        var door = new Option<string?>("--first-sighting-door") { Description = "experiment: a file of trace block ids; a block's first sighting enters a tier only if listed (perf/Replay/first_reuse_door.py writes it)" };
        var cmd = new Command("replay", "Token hit rate of an eviction policy on a request trace (prefix semantics), against LRU, Belady's MIN and an infinite cache.")
        {
            trace, tpb, capacity, policy, ssdPolicy, blockBytes, requests, noMicro, quick, json, engine, door,
        };
        cmd.SetAction(p =>
        {
            int max = p.GetValue(requests) ?? (p.GetValue(quick) ? QuickRequests : int.MaxValue);
            var o = new Options
            {
                TracePath = p.GetValue(trace)!,
                TokensPerBlock = p.GetValue(tpb),
                CapacityBlocks = ParseCapacity(p.GetValue(capacity)!),
                Policy = p.GetValue(policy)!,
                SsdPolicy = p.GetValue(ssdPolicy),
                BlockBytes = checked((int)Sizes.Parse(p.GetValue(blockBytes)!)),
                MaxRequests = max,
                MicroBench = !p.GetValue(noMicro),
                FirstSightingDoor = p.GetValue(door),
                Engine = p.GetValue(engine) is "tier-manager" or "simulator" ? p.GetValue(engine)! : throw new ArgumentException($"--engine {p.GetValue(engine)}: use tier-manager or simulator"),
            };
            JsonReport.Write(p.GetValue(json), Run(o));
            return 0;
        });
        return cmd;
    }

    public static int[] ParseCapacity(string text)
    {
        var parts = text.Split(',', StringSplitOptions.TrimEntries);
        if (parts.Length is not (1 or 3))
            throw new ArgumentException($"--capacity-blocks {text}: use N (one DRAM tier) or G,D,S (GPU, DRAM, SSD)");
        var caps = new int[parts.Length];
        for (int i = 0; i < parts.Length; i++)
        {
            if (!int.TryParse(parts[i], NumberStyles.None, CultureInfo.InvariantCulture, out caps[i]) || caps[i] < 1)
                throw new ArgumentException($"--capacity-blocks {text}: '{parts[i]}' is not a positive block count");
        }
        return caps;
    }

    // The hierarchy under test: one DRAM tier, or GPU, DRAM and SSD; every tier's policy counted for ops/s.
    public static (IReplayCache Cache, CountingPolicy[] Counters) Build(Options o, string policySpec)
    {
        TierKind[] kinds = o.CapacityBlocks.Length == 1 ? [TierKind.Host] : [TierKind.Gpu, TierKind.Host, TierKind.Ssd];
        var counters = new CountingPolicy[kinds.Length];
        var admitted = o.FirstSightingDoor is null ? null : Replay.FirstSightingDoor.Load(o.FirstSightingDoor);
        var tiers = new SimulatedTier[kinds.Length];
        for (int t = 0; t < kinds.Length; t++)
        {
            // One spec names the hierarchy's policy (a middle tier then ranks by recency: PolicyFactory.Create); a list
            // (G,D,S) names each tier's, exactly.
            string[] perTier = policySpec.Split(',', StringSplitOptions.TrimEntries);
            string spec = kinds[t] == TierKind.Ssd && o.SsdPolicy is not null ? o.SsdPolicy : perTier[Math.Min(t, perTier.Length - 1)];
            bool middle = perTier.Length == 1 && t > 0 && t < kinds.Length - 1;
            var policy = PolicyFactory.Create(spec, o.CapacityBlocks[t], o.TokensPerBlock, middle);
            counters[t] = new CountingPolicy(admitted is null ? policy : new FirstSightingDoor(policy, admitted));
            tiers[t] = new SimulatedTier(kinds[t], o.CapacityBlocks[t], counters[t]);
        }
        string name = string.Join(",", counters.Select(c => c.Name).Distinct());
        return (o.Engine == "simulator"
            ? new PolicySimulatorCache(tiers, o.BlockBytes, name)
            : new TierManagerReplayCache(tiers, o.BlockBytes, name), counters);
    }

    public static JsonObject Run(Options o)
    {
        ReplayTrace trace = null!;
        ReplayResult tested = null!, lru = null!, belady = null!, infinite = null!;
        IReplayCache testedCache = null!;
        double testedSeconds = 0;
        long testedCalls = 0;
        var micro = new List<PolicyMicroBench.Result>();
        int total = o.CapacityBlocks.Sum();
        string label = $"{o.Policy} @ {string.Join(",", o.CapacityBlocks)} blocks";
        AnsiConsole.Status().Start($"replay {label}", ctx =>
        {
            ctx.Status($"loading {o.TracePath}");
            trace = ReplayTrace.Load(o.TracePath, o.TokensPerBlock, o.MaxRequests);
            ctx.Status($"replaying {trace.Count} requests: {o.Policy}");
            var (cache, counters) = Build(o, o.Policy);
            var sw = Stopwatch.StartNew();
            tested = ReplayRunner.Run(trace, cache);
            testedSeconds = sw.Elapsed.TotalSeconds;
            testedCalls = counters.Sum(c => c.Calls);
            testedCache = cache;
            if (o.Policy == "lru" && o.SsdPolicy is null && o.FirstSightingDoor is null)
            {
                lru = tested;
            }
            else
            {
                ctx.Status("replaying: lru (the baseline)");
                lru = ReplayRunner.Run(trace, Build(o with { SsdPolicy = null, FirstSightingDoor = null }, "lru").Cache);
            }
            ctx.Status($"oracle: Belady's MIN with bypass, {total} blocks");
            belady = ReplayOracles.Belady(trace, total);
            ctx.Status("oracle: infinite cache");
            infinite = ReplayOracles.Infinite(trace);
            if (o.MicroBench)
            {
                foreach (string spec in new[] { "lru", "cost" })
                {
                    ctx.Status($"micro-benchmark: {spec} ops/s");
                    micro.Add(PolicyMicroBench.Measure(spec, 4096, 400_000, o.TokensPerBlock));
                }
            }
        });
        return Report(o, trace, tested, testedCache, testedSeconds, testedCalls, lru, belady, infinite, micro);
    }

    private static JsonObject Report(Options o, ReplayTrace trace, ReplayResult tested, IReplayCache cache, double seconds, long calls,
        ReplayResult lru, ReplayResult belady, ReplayResult infinite, List<PolicyMicroBench.Result> micro)
    {
        var report = JsonReport.Header("replay");
        report["trace"] = Path.GetFileName(o.TracePath);
        report["policy"] = tested.Name;
        report["engine"] = o.Engine;
        if (o.FirstSightingDoor is not null)
            report["first_sighting_door"] = Path.GetFileName(o.FirstSightingDoor);
        report["tokens_per_block"] = o.TokensPerBlock;
        report["block_bytes"] = o.BlockBytes;
        report["capacity_blocks"] = new JsonArray([.. o.CapacityBlocks.Select(c => (JsonNode)c)]);
        report["tiers"] = new JsonArray([.. cache.Tiers.Select(k => (JsonNode)k.ToString())]);
        report["requests"] = tested.Requests;
        report["input_tokens"] = tested.InputTokens;
        report["distinct_blocks"] = trace.DistinctBlocks;
        report["token_hit_rate"] = JsonReport.Round(tested.TokenHitRate);
        report["lru_token_hit_rate"] = JsonReport.Round(lru.TokenHitRate);
        report["belady_token_hit_rate"] = JsonReport.Round(belady.TokenHitRate);
        report["infinite_token_hit_rate"] = JsonReport.Round(infinite.TokenHitRate);
        report["vs_lru"] = JsonReport.Round(tested.TokenHitRate / lru.TokenHitRate);
        report["vs_belady"] = JsonReport.Round(tested.TokenHitRate / belady.TokenHitRate);
        report["vs_infinite"] = JsonReport.Round(tested.TokenHitRate / infinite.TokenHitRate);
        report["compute_hit_rate"] = JsonReport.Round(tested.ComputeHitRate);
        report["lru_compute_hit_rate"] = JsonReport.Round(lru.ComputeHitRate);
        report["belady_compute_hit_rate"] = JsonReport.Round(belady.ComputeHitRate);
        report["infinite_compute_hit_rate"] = JsonReport.Round(infinite.ComputeHitRate);
        report["requests_with_hit"] = tested.RequestsWithHit;
        var perTier = new JsonObject();
        var moved = new JsonObject();
        for (int t = 0; t < cache.Tiers.Count; t++)
        {
            string k = cache.Tiers[t].ToString().ToLowerInvariant();
            perTier[k] = new JsonObject
            {
                ["hit_tokens"] = tested.HitTokensByTier[t],
                ["token_hit_rate"] = JsonReport.Round((double)tested.HitTokensByTier[t] / tested.InputTokens),
                ["blocks_written"] = cache.Stats.BlocksWritten[t],
                ["bypassed"] = cache.Stats.Bypassed[t],
            };
            if (t + 1 < cache.Tiers.Count)
                moved[$"{k}_to_{cache.Tiers[t + 1].ToString().ToLowerInvariant()}"] = cache.Stats.BytesDemotedFrom[t];
            if (t + 1 < cache.Tiers.Count)
                moved[$"promoted_to_{k}"] = cache.Stats.BytesPromotedTo[t];
        }
        report["per_tier"] = perTier;
        report["bytes_moved"] = moved;
        report["blocks_dropped"] = cache.Stats.BlocksDropped;
        report["blocks_not_stored"] = cache.Stats.BlocksNotStored;
        report["replay_seconds"] = JsonReport.Round(seconds);
        report["policy_calls"] = calls;
        report["replay_policy_calls_per_second"] = JsonReport.Round(calls / seconds);
        var microJson = new JsonObject();
        foreach (var m in micro)
            microJson[m.Policy] = new JsonObject { ["ops_per_second"] = Math.Round(m.OpsPerSecond), ["operations"] = m.Operations };
        if (micro.Count > 0)
            report["policy_microbench"] = microJson;

        var table = new Table().AddColumns("cache", "token hit rate", $"{tested.Name} / this", "prefill compute saved");
        void Row(string name, ReplayResult r) => table.AddRow(name, $"{r.TokenHitRate:P2}", $"{tested.TokenHitRate / r.TokenHitRate:F2}x", $"{r.ComputeHitRate:P2}");
        Row(tested.Name, tested);
        if (!ReferenceEquals(lru, tested))
            Row("lru", lru);
        Row("belady (MIN, bypass)", belady);
        Row("infinite", infinite);
        for (int t = 0; t < cache.Tiers.Count && cache.Tiers.Count > 1; t++)
            table.AddRow($"  hits in {cache.Tiers[t]}", $"{(double)tested.HitTokensByTier[t] / tested.InputTokens:P2}", "", "");
        table.AddRow("replay", $"{tested.Requests} requests in {seconds:F2} s, {calls / seconds / 1e6:F2} M policy calls/s ({o.Engine})", "", "");
        foreach (var m in micro)
            table.AddRow($"micro-bench {m.Policy}", $"{m.OpsPerSecond / 1e6:F2} M ops/s", "", "");
        AnsiConsole.Write(new Rule($"replay: {Path.GetFileName(o.TracePath)}, {label(o)}"));
        AnsiConsole.Write(table);
        return report;

        static string label(Options o) => $"{o.Policy}, {string.Join(",", o.CapacityBlocks)} blocks of {o.TokensPerBlock} tokens";
    }
}
