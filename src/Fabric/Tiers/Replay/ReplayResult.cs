using KvFabric.Tiers.Policies;

namespace KvFabric.Tiers.Replay;

// Token hits of one replay under prefix semantics: a request reuses only its longest cached prefix; each matched
// block counts its tokens (tokens_per_block, or fewer for a partial last block), so hit tokens are
// min(matched × tokens_per_block, input_length); the denominator is the sum of input_length.
public sealed class ReplayResult
{
    public ReplayResult(string name, int tiers)
    {
        Name = name;
        HitTokensByTier = new long[tiers];
    }

    public string Name { get; }
    public int Requests { get; private set; }
    public long InputTokens { get; private set; }
    public long HitTokens { get; private set; }
    public long HitBlocks { get; private set; }
    public long RequestsWithHit { get; private set; }

    // Hit tokens by the tier that held each matched block (index = position in the cache's tier list).
    public long[] HitTokensByTier { get; }

    public double TokenHitRate => InputTokens == 0 ? 0 : (double)HitTokens / InputTokens;

    // The same hits weighted by prefill work (PrefillCost, default attention crossover): the share of prefill compute
    // the cache saved. Deeper blocks weigh more, as they cost more to recompute.
    public double PrefillSaved { get; private set; }
    public double PrefillTotal { get; private set; }
    public double ComputeHitRate => PrefillTotal == 0 ? 0 : PrefillSaved / PrefillTotal;

    public void Count(ReplayTrace trace, in TraceRequest request, int matched, ReadOnlySpan<int> tierOfMatched)
    {
        ArgumentNullException.ThrowIfNull(trace);
        Requests++;
        InputTokens += request.InputLength;
        HitTokens += trace.HitTokens(request.InputLength, matched);
        HitBlocks += matched;
        if (matched > 0)
            RequestsWithHit++;
        for (int i = 0; i < request.ChainLength; i++)
        {
            int tokens = trace.TokensOfBlock(request.InputLength, i);
            double work = PrefillCost.OfBlock(i, tokens, trace.TokensPerBlock, PrefillCost.DefaultAttentionCrossoverTokens);
            PrefillTotal += work;
            if (i >= matched)
                continue;
            PrefillSaved += work;
            int tier = tierOfMatched.IsEmpty ? 0 : tierOfMatched[i];
            HitTokensByTier[tier] += tokens;
        }
    }
}

// Replays a trace against a cache: per request, the prefix lookup is counted, then the whole chain is put.
public static class ReplayRunner
{
    public static ReplayResult Run(ReplayTrace trace, IReplayCache cache, int maxRequests = int.MaxValue, Action<int>? afterRequest = null)
    {
        ArgumentNullException.ThrowIfNull(trace);
        ArgumentNullException.ThrowIfNull(cache);
        int requests = Math.Min(maxRequests, trace.Count);
        var result = new ReplayResult(cache.Name, cache.Tiers.Count);
        var kinds = new TierKind[Math.Max(1, trace.MaxChainLength)];
        var tierIndex = new int[kinds.Length];
        for (int r = 0; r < requests; r++)
        {
            var chain = trace.Chain(r);
            int matched = cache.LookupPrefix(chain, kinds);
            for (int i = 0; i < matched; i++)
                tierIndex[i] = IndexOf(cache.Tiers, kinds[i]);
            result.Count(trace, trace[r], matched, tierIndex.AsSpan(0, matched));
            // Partial blocks are never shared (docs/architecture.md): a worker offloads only the full blocks.
            cache.Put(chain[..trace.FullBlocks(r)]);
            afterRequest?.Invoke(r);
        }
        return result;
    }

    private static int IndexOf(IReadOnlyList<TierKind> tiers, TierKind kind)
    {
        for (int i = 0; i < tiers.Count; i++)
        {
            if (tiers[i] == kind)
                return i;
        }
        throw new InvalidOperationException($"The cache reported a hit in {kind}, which is not one of its tiers.");
    }
}
