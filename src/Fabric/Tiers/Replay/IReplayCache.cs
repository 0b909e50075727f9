namespace KvFabric.Tiers.Replay;

// The cache under test in a replay: what a prefill worker's sidecar does for one request. The replay calls
// LookupPrefix, counts the hit, then Put with the whole chain (the worker onboards the hit prefix, computes the rest,
// and offloads every block, in chain order).
public interface IReplayCache
{
    string Name { get; }

    // The tiers, fastest first.
    IReadOnlyList<TierKind> Tiers { get; }

    // Length of the longest prefix of chain that is resident in some tier; tierOf[i] is the tier holding block i for
    // each i below that length. Does not change any state a policy sees.
    int LookupPrefix(ReadOnlySpan<BlockKey> chain, Span<TierKind> tierOf);

    // The request used every block of chain (a hit promotes, a miss is offered for admission).
    void Put(ReadOnlySpan<BlockKey> chain);

    // Movement so far, for the report.
    ReplayCacheStats Stats { get; }
}

// Bytes and blocks moved by a cache in a replay, per tier (index = position in Tiers).
public sealed class ReplayCacheStats
{
    public ReplayCacheStats(int tiers)
    {
        BlocksWritten = new long[tiers];
        BytesDemotedFrom = new long[tiers];
        BytesPromotedTo = new long[tiers];
        Bypassed = new long[tiers];
    }

    // Blocks that entered each tier (new blocks, demotions and promotions into it): the tier's write traffic.
    public long[] BlocksWritten { get; }

    // Bytes moved from tier i down to a slower tier.
    public long[] BytesDemotedFrom { get; }

    // Bytes moved up into tier i from a slower tier (promotion of a hit).
    public long[] BytesPromotedTo { get; }

    // Times a full tier's policy refused a block (it went on to a slower tier, or nowhere).
    public long[] Bypassed { get; }

    // Blocks that left the last tier (or were refused by every tier on demotion) and are gone.
    public long BlocksDropped { get; set; }

    // New blocks that no tier took; the rest of their chain was not offered (it could never be reached by a prefix).
    public long BlocksNotStored { get; set; }
}
