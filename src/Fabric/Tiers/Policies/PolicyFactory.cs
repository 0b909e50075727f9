namespace KvFabric.Tiers.Policies;

// Builds a tier's policy from its name, as written in configuration and on the command line:
//   lru | cost | cost-noadmit, optionally followed by +seen-twice (the admission filter for a write-averse tier).
public static class PolicyFactory
{
    public const string Names = "lru, cost, cost-noadmit (each optionally +seen-twice)";

    private const string SeenTwiceSuffix = "+seen-twice";

    public static IEvictionPolicy Create(string spec, int capacityBlocks, int tokensPerBlock)
    {
        ArgumentException.ThrowIfNullOrWhiteSpace(spec);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacityBlocks, 1);
        string name = spec.Trim().ToLowerInvariant();
        if (name.EndsWith(SeenTwiceSuffix, StringComparison.Ordinal))
            return new SeenTwiceAdmission(Create(name[..^SeenTwiceSuffix.Length], capacityBlocks, tokensPerBlock), capacityBlocks);
        return name switch
        {
            "lru" => new LruPolicy(capacityBlocks),
            "cost" => new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = capacityBlocks, TokensPerBlock = tokensPerBlock }),
            "cost-noadmit" => new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = capacityBlocks, TokensPerBlock = tokensPerBlock, Admission = false }),
            _ => throw new ArgumentException($"Unknown eviction policy '{spec}': use {Names}.", nameof(spec)),
        };
    }
}
