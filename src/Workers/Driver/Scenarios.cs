using System.Globalization;
using System.Text.Json.Nodes;
using KvFabric.Rpc.V1;
using KvFabric.Workers.Model;
using KvFabric.Workers.Serving;

namespace KvFabric.Workers.Driver;

/// <summary>The figures of one replay: latency percentiles, reuse by tier, hand-off share of TTFT.</summary>
public sealed record RunSummary(
    string Label, int Requests, int Failed, double TtftP50, double TtftP90, double TtftP99, double ItlP50, double ItlP99,
    double HandoffP50, double HandoffFractionOfTtft, long PromptBlocks, long ReusedBlocks, long FetchedBlocks, long[] ReusedByTier,
    double ComputeP50, double OnboardP50, int Retried, double TtftDeliveredP50 = 0, double MeanItl = 0, double ItlMax = 0, int ItlSamples = 0)
{
    public double HitRate => PromptBlocks == 0 ? 0 : (double)ReusedBlocks / PromptBlocks;

    public static RunSummary Of(string label, IReadOnlyList<RequestResult> results, int tokensPerBlock)
    {
        RequestResult[] ok = [.. results.Where(r => r.Ok)];
        double[] ttft = [.. ok.Select(r => r.TtftMs)];
        double[] itl = [.. ok.SelectMany(r => r.ItlMs)];
        double[] handoff = [.. ok.Where(r => r.Prefill is not null).Select(r => r.Prefill!.HandoffMs)];
        var byTier = new long[4];
        foreach (RequestResult r in ok.Where(r => r.Prefill is not null))
        {
            for (int t = 0; t < Math.Min(4, r.Prefill!.ReusedByTier.Count); t++)
                byTier[t] += r.Prefill.ReusedByTier[t];
        }

        // The hand-off's share of each request's TTFT, then the median of those (per request, so it is a real fraction).
        double[] fractions = [.. ok.Where(r => r.Prefill is not null && r.TtftMs > 0).Select(r => r.Prefill!.HandoffMs / r.TtftMs)];
        return new RunSummary(label, results.Count, results.Count - ok.Length, Percentile(ttft, 50), Percentile(ttft, 90), Percentile(ttft, 99),
            Percentile(itl, 50), Percentile(itl, 99), Percentile(handoff, 50), Percentile(fractions, 50),
            ok.Sum(r => (long)((r.Prefill?.PromptTokens ?? 0) / (uint)tokensPerBlock)), ok.Sum(r => (long)(r.Prefill?.ReusedBlocks ?? 0)),
            ok.Sum(r => (long)(r.Prefill?.FetchedBlocks ?? 0)), byTier,
            Percentile([.. ok.Where(r => r.Prefill is not null).Select(r => r.Prefill!.ComputeMs)], 50),
            Percentile([.. ok.Where(r => r.Prefill is not null).Select(r => r.Prefill!.OnboardMs)], 50), ok.Count(r => r.Attempts > 1),
            Percentile([.. ok.Select(r => r.TtftDeliveredMs)], 50), itl.Length == 0 ? 0 : itl.Average(), itl.Length == 0 ? 0 : itl.Max(), itl.Length);
    }

    public static double Percentile(double[] values, double p)
    {
        if (values.Length == 0)
            return 0;
        double[] a = [.. values.Order()];
        double rank = p / 100 * (a.Length - 1);
        int lo = (int)Math.Floor(rank), hi = (int)Math.Ceiling(rank);
        return a[lo] + ((a[hi] - a[lo]) * (rank - lo));
    }

    public JsonObject ToJson() => new()
    {
        ["label"] = Label, ["requests"] = Requests, ["failed"] = Failed, ["retried"] = Retried,
        ["ttft_ms"] = new JsonObject { ["p50"] = R(TtftP50), ["p90"] = R(TtftP90), ["p99"] = R(TtftP99), ["p50_delivered"] = R(TtftDeliveredP50) },
        ["itl_ms"] = new JsonObject { ["p50"] = R(ItlP50), ["p99"] = R(ItlP99), ["mean"] = R(MeanItl), ["max"] = R(ItlMax), ["samples"] = ItlSamples },
        ["handoff_ms_p50"] = R(HandoffP50), ["handoff_fraction_of_ttft_p50"] = R(HandoffFractionOfTtft),
        ["prefill_compute_ms_p50"] = R(ComputeP50), ["prefill_onboard_ms_p50"] = R(OnboardP50),
        ["prompt_blocks"] = PromptBlocks, ["reused_blocks"] = ReusedBlocks, ["fetched_from_other_nodes"] = FetchedBlocks, ["hit_rate"] = R(HitRate),
        ["reused_by_tier"] = new JsonObject { ["gpu_emulated"] = ReusedByTier[(int)Tier.Gpu], ["host"] = ReusedByTier[(int)Tier.Host], ["ssd"] = ReusedByTier[(int)Tier.Ssd] },
    };

    public string Line() => string.Create(CultureInfo.InvariantCulture,
        $"{Label,-22} {Requests - Failed,4}/{Requests,-4} TTFT p50 {TtftP50,8:0.0} p90 {TtftP90,8:0.0} p99 {TtftP99,8:0.0} ms | ITL p50 {ItlP50,6:0.00} p99 {ItlP99,6:0.00} ms | " +
        $"hit {HitRate,6:P1} (gpu* {ReusedByTier[1]}, host {ReusedByTier[2]}, ssd {ReusedByTier[3]}; {FetchedBlocks} from other nodes) | hand-off p50 {HandoffP50:0.00} ms ({HandoffFractionOfTtft:P1} of TTFT)");

    private static double R(double v) => double.IsFinite(v) ? Math.Round(v, 3) : 0;
}

/// <summary>Checks outputs against a monolithic run: the same model in this process, no fabric, no hand-off, greedy.</summary>
public static class MonolithicCheck
{
    /// <summary>Reference tokens of every request (computed once per distinct prompt).</summary>
    public static Dictionary<int, int[]> Reference(IReadOnlyList<WorkloadRequest> requests, ModelConfig config, int threads = 0)
    {
        var model = new Transformer(config, threads);
        using var pool = model.CreatePool(config.MaxPositions / config.TokensPerBlock + 1);
        var reference = new Dictionary<int, int[]>();
        foreach (WorkloadRequest r in requests)
        {
            using KvCache cache = model.CreateCache(pool);
            reference[r.Id] = model.Generate(r.Prompt, r.MaxNewTokens, Sampler.Greedy(), cache);
        }

        return reference;
    }

    /// <summary>Requests whose output was compared and equal; every other (failed or different) is listed in mismatches.</summary>
    public static int Compare(IReadOnlyList<RequestResult> results, Dictionary<int, int[]> reference, List<string> mismatches)
    {
        int equal = 0;
        foreach (RequestResult r in results)
        {
            if (!r.Ok)
                mismatches.Add($"request {r.Id}: failed ({r.Error})");
            else if (!reference.TryGetValue(r.Id, out int[]? expected) || !expected.AsSpan().SequenceEqual(r.Tokens))
                mismatches.Add($"request {r.Id}: tokens differ from the monolithic run");
            else
                equal++;
        }

        return equal;
    }
}

/// <summary>Bytes the workers moved, by transfer backend (from their Status).</summary>
public static class TransferTotals
{
    public static async Task<JsonObject> OfAsync(IEnumerable<WorkerClient> workers)
    {
        ulong tcp = 0, shm = 0, ucx = 0, retries = 0, fallbacks = 0;
        foreach (WorkerClient w in workers)
        {
            WorkerStatus s = await w.StatusAsync().ConfigureAwait(false);
            tcp += s.TcpBytesSent;
            shm += s.ShmBytesWritten;
            ucx += s.UcxBytesSent;
            retries += s.HandoffRetries;
            fallbacks += s.Fallbacks;
        }

        return new JsonObject { ["tcp"] = tcp, ["shm"] = shm, ["ucx"] = ucx, ["handoff_retries"] = retries, ["prefill_fallbacks"] = fallbacks };
    }
}
