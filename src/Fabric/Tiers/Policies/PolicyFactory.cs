using System.Globalization;

namespace KvFabric.Tiers.Policies;

// Builds a tier's policy from its name, as written in configuration and on the command line:
//   lru | cost | cost-noadmit, then for the cost policy optional :history=N (its frequency horizon, in sightings) and
//   :probation=F (a fixed probation share in [0, 1] instead of the adaptive one) and :depth=on|off (weigh blocks by their
//   depth's prefill cost; off by default), then optionally +seen-twice (the
//   admission filter for a write-averse tier). Example: cost:history=40000:probation=0+seen-twice.
public static class PolicyFactory
{
    public const string Names = "lru, cost, cost-noadmit (cost takes :history=N, :probation=F and :depth=on|off), each optionally +seen-twice";

    private const string SeenTwiceSuffix = "+seen-twice";

    // middleTier: the tier has a faster tier above it and a slower one below it (DRAM between GPU and SSD). There the
    // cost policies rank by recency (an LruPolicy, named lru), because a middle tier neither admits blocks for the
    // hierarchy nor loses them: what it evicts goes down, what it holds was put or demoted into it. Ranking it by its own
    // hits kept reused blocks there (and, in the TierManager, the copies a promotion leaves behind) while the SSD, where
    // blocks are lost, received the rest out of recency order: three tiers of cost reached 29.6% against 30.4% for LRU
    // in the simulator, and 27.8% against 29.8% through the TierManager; with the middle tier by recency, 30.9% and
    // 30.4% (docs/tiers-policies.md). The entry and last tiers keep the cost policy.
    public static IEvictionPolicy Create(string spec, int capacityBlocks, int tokensPerBlock, bool middleTier = false)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(spec);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacityBlocks, 1);
        string name = spec.Trim().ToLowerInvariant();
        if (name.EndsWith(SeenTwiceSuffix, StringComparison.Ordinal))
            return new SeenTwiceAdmission(Create(name[..^SeenTwiceSuffix.Length], capacityBlocks, tokensPerBlock, middleTier), capacityBlocks);
        int? history = null;
        double? probation = null;
        bool? depth = null;
        string[] parts = name.Split(':');
        name = parts[0];
        foreach (string parameter in parts.AsSpan(1))
        {
            string[] kv = parameter.Split('=', 2);
            bool ok = kv.Length == 2;
            if (ok && kv[0] == "history" && int.TryParse(kv[1], NumberStyles.None, CultureInfo.InvariantCulture, out int h) && h > 0)
                history = h;
            else if (ok && kv[0] == "probation" && double.TryParse(kv[1], NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double f) && f is >= 0 and <= 1)
                probation = f;
            else if (ok && kv[0] == "depth" && kv[1] is "on" or "off")
                depth = kv[1] == "on";
            else
                throw new ArgumentException($"Eviction policy '{spec}': '{parameter}' is not history=N (N > 0), probation=F (0 <= F <= 1) or depth=on|off.", nameof(spec));
        }
        return name switch
        {
            "lru" when history is null && probation is null && depth is null => new LruPolicy(capacityBlocks),
            "cost" or "cost-noadmit" when middleTier => new LruPolicy(capacityBlocks),
            "cost" or "cost-noadmit" => new CostAwarePolicy(new CostAwareOptions
            {
                ExpectedBlocks = capacityBlocks,
                TokensPerBlock = tokensPerBlock,
                HistorySightings = history,
                ProbationShare = probation,
                WeighDepth = depth ?? false,
                Admission = name == "cost",
            }),
            _ => throw new ArgumentException($"Unknown eviction policy '{spec}': use {Names}.", nameof(spec)),
        };
    }
}
