using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Index;

// One worker's hit for a prompt chain: the longest prefix it holds entirely, split by the fastest tier of each block.
public readonly record struct MatchResult(int WorkerId, int Matched, int Gpu, int Host, int Ssd);

// A snapshot line: `Hashes` is a chain under `Parent` (null = a root chain) that `Worker` holds in `Tier`.
// Dump emits these parents-first, so applying them in order to an empty tree rebuilds what was dumped.
public sealed record StoredRun(int Worker, BlockHash? Parent, BlockHash[] Hashes, TierKind Tier);

public enum ApplyStatus : byte
{
    Applied = 0,
    UnknownParent = 1,   // the event's parent has no entry: the stored blocks would hang from nothing
    ParentMismatch = 2,  // a block already in the tree has a different parent than the event claims
    BadTier = 3,
    ZeroHash = 4,        // the all-zero hash marks empty slots; no SHA-256 prefix is ever zero, so it is a broken producer
}

public enum IndexEventKind : byte
{
    Stored = 0,
    Removed = 1,
    Cleared = 2,
}

// Why the index's writer dropped an event; the names are the counter keys in IndexCounters.Rejected.
public enum RejectReason
{
    HashLength = 0,
    ParentLength,
    UnknownParent,
    ParentMismatch,
    Tier,
    Worker,
    Kind,
    ZeroHash,
    Exception,
}

public static class RejectReasons
{
    public const int Count = (int)RejectReason.Exception + 1;

    public static string Name(RejectReason reason) => reason switch
    {
        RejectReason.HashLength => "hash_length",
        RejectReason.ParentLength => "parent_length",
        RejectReason.UnknownParent => "unknown_parent",
        RejectReason.ParentMismatch => "parent_mismatch",
        RejectReason.Tier => "tier",
        RejectReason.Worker => "worker",
        RejectReason.Kind => "kind",
        RejectReason.ZeroHash => "zero_hash",
        _ => "exception",
    };
}

// An event as it comes off the wire: hashes packed as 16-byte digests, parent empty (a root chain) or 16 bytes.
// The index keeps a reference to the bytes until the writer has applied the event: do not reuse the buffers before that
// (FlushAsync returns once everything enqueued before it is applied). Tier null on a Cleared event means every tier.
public readonly record struct IndexEvent(
    uint Tenant, int Worker, IndexEventKind Kind, ReadOnlyMemory<byte> Parent, ReadOnlyMemory<byte> Hashes, TierKind? Tier)
{
    public static IndexEvent Stored(uint tenant, int worker, ReadOnlyMemory<byte> parent, ReadOnlyMemory<byte> hashes, TierKind tier) =>
        new(tenant, worker, IndexEventKind.Stored, parent, hashes, tier);

    public static IndexEvent Removed(uint tenant, int worker, ReadOnlyMemory<byte> hashes, TierKind tier) =>
        new(tenant, worker, IndexEventKind.Removed, ReadOnlyMemory<byte>.Empty, hashes, tier);

    public static IndexEvent Cleared(uint tenant, int worker, TierKind? tier) =>
        new(tenant, worker, IndexEventKind.Cleared, ReadOnlyMemory<byte>.Empty, ReadOnlyMemory<byte>.Empty, tier);

    // Packs hashes into the wire form; for tests and tools, not the hot path.
    public static byte[] Pack(ReadOnlySpan<BlockHash> hashes)
    {
        var bytes = new byte[hashes.Length * BlockHash.Size];
        for (int i = 0; i < hashes.Length; i++)
            hashes[i].WriteTo(bytes.AsSpan(i * BlockHash.Size));
        return bytes;
    }
}

public sealed record IndexCounters(
    long AppliedEvents, long AppliedBlocks, long RemovedNotHeld, IReadOnlyDictionary<string, long> Rejected, int QueueDepth,
    int Tenants, long Blocks, long Locations, long BytesAllocated)
{
    public long RejectedTotal => Rejected.Values.Sum();
}
