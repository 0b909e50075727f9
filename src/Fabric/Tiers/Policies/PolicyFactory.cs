using System.Globalization;

namespace KvFabric.Tiers.Policies;

// Builds a tier's policy from its name, as written in configuration and on the command line:
//   lru | cost | cost-noadmit, then optionally :history=N (the cost policy's frequency horizon, in sightings),
//   then optionally +seen-twice (the admission filter for a write-averse tier).
public static class PolicyFactory
{
    public const string Names = "lru, cost, cost-noadmit (cost takes :history=N), each optionally +seen-twice";

    private const string SeenTwiceSuffix = "+seen-twice";
    private const string HistoryParameter = ":history=";

    public static IEvictionPolicy Create(string spec, int capacityBlocks, int tokensPerBlock)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(spec);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacityBlocks, 1);
        string name = spec.Trim().ToLowerInvariant();
        if (name.EndsWith(SeenTwiceSuffix, StringComparison.Ordinal))
            return new SeenTwiceAdmission(Create(name[..^SeenTwiceSuffix.Length], capacityBlocks, tokensPerBlock), capacityBlocks);
        int? history = null;
        int at = name.IndexOf(HistoryParameter, StringComparison.Ordinal);
        if (at >= 0)
        {
            string value = name[(at + HistoryParameter.Length)..];
            if (!int.TryParse(value, NumberStyles.None, CultureInfo.InvariantCulture, out int h) || h < 1)
                throw new ArgumentException($"Eviction policy '{spec}': history must be a positive number of sightings.", nameof(spec));
            history = h;
            name = name[..at];
        }
        return name switch
        {
            "lru" when history is null => new LruPolicy(capacityBlocks),
            "cost" or "cost-noadmit" => new CostAwarePolicy(new CostAwareOptions
            {
                ExpectedBlocks = capacityBlocks,
                TokensPerBlock = tokensPerBlock,
                HistorySightings = history,
                Admission = name == "cost",
            }),
            _ => throw new ArgumentException($"Unknown eviction policy '{spec}': use {Names}.", nameof(spec)),
        };
    }
}
