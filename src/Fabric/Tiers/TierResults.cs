using KvFabric.Blocks;

namespace KvFabric.Tiers;

public enum PutStatus : byte
{
    // Every block of the batch is cached (new or already present).
    Stored = 0,
    // The batch names a parent that is not cached: its blocks would be unreachable, so none was stored.
    ParentMissing = 1,
    // No tier could make room (everything evictable is pinned, in use, or a parent of a cached block).
    ResourceExhausted = 2,
    // Every tier's admission refused a block.
    Refused = 3,
    // A store failed (I/O error) at every tier that would have taken a block.
    StoreFailed = 4,
}

// Blocks are stored in chain order; the first block that cannot be stored ends the batch (its descendants would be
// orphans), so the stored blocks are always a prefix of the batch. Detail explains a status other than Stored.
public readonly record struct PutResult(PutStatus Status, int Stored, int AlreadyPresent, int NotStored, string? Detail)
{
    public bool IsComplete => Status == PutStatus.Stored;

    public void ThrowIfIncomplete()
    {
        if (Status == PutStatus.ResourceExhausted)
            throw new TierResourceExhaustedException(Detail ?? "no tier could make room");
        if (Status != PutStatus.Stored)
            throw new TierException($"put stored {Stored} of {Stored + AlreadyPresent + NotStored} blocks ({Status}): {Detail}");
    }
}

public sealed class TierResourceExhaustedException : TierException
{
    public TierResourceExhaustedException(string message) : base($"RESOURCE_EXHAUSTED: {message}") { }
}

public readonly record struct BlockPut(BlockHash Hash, ReadOnlyMemory<byte> Bytes);

// Matched: the longest cached prefix. Served: the prefix worth loading once the load-versus-recompute gate has
// spoken (equal to Matched when the gate is off); blocks past Served should be recomputed.
public readonly record struct LookupResult(int Matched, int Served);

public readonly record struct DeleteResult(int Deleted, int KeptBusy);

// Cleared: blocks dropped. KeptBusy: blocks kept because they were pinned or in use by a transfer, with their ancestors.
public readonly record struct ClearResult(int Cleared, int KeptBusy);

// Per tier. BytesIn/BytesOut count every block that entered or left the tier (puts, moves, deletes); BytesMovedIn
// only what arrived by demotion or promotion from another tier. Evictions counts blocks evicted to make room.
public sealed record TierStats(
    TierKind Kind,
    string Policy,
    long CapacityBytes,
    long UsedBytes,
    long ReservedBytes,
    int Blocks,
    long Hits,
    long Evictions,
    long DemotionsIn,
    long PromotionsIn,
    long BytesMovedIn,
    long BytesIn,
    long BytesOut,
    long AdmissionRefusals,
    long StoreErrors,
    double ReadBandwidthBytesPerSecond,
    double ReadLatencySeconds);

// Misses counts requested blocks GetAsync could not read (absent, or after the first absent block of a chain).
public sealed record TierManagerStats(
    IReadOnlyList<TierStats> Tiers,
    int Blocks,
    long Misses,
    long PromotionsQueued,
    long PromotionsSkipped,
    long PromotionsFailed,
    ulong LastEventSequence);
