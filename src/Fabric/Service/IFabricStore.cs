using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Service;

/// <summary>
/// What the sidecar's API needs from block storage. Every operation is scoped to a tenant: a tenant never sees, pins or
/// deletes another tenant's blocks, whatever hash values it presents.
/// </summary>
public interface IFabricStore : IDisposable
{
    KvLayout Layout { get; }
    int BlockBytes { get; }
    string Node { get; }

    /// <summary>Per-tenant KV event logs (Stored, Removed, Cleared) with sequence numbers.</summary>
    KvEventLogs Events { get; }

    /// <summary>Length of the longest cached prefix of the chain; tiers[i] is the tier of matched block i.</summary>
    int Lookup(uint tenant, ReadOnlySpan<BlockHash> chain, Span<TierKind> tiers);

    /// <summary>Starts an all-or-nothing Put: blocks are staged, then committed together; disposing uncommitted aborts.</summary>
    IPutBatch BeginPut(uint tenant);

    /// <summary>Opens a block for reading; null when absent. The block stays (never evicted, moved out or deleted) until
    /// disposed; its bytes come from <see cref="ReadLease.LoadAsync"/>.</summary>
    ValueTask<ReadLease?> OpenReadAsync(uint tenant, BlockHash hash, CancellationToken cancellationToken);

    /// <summary>Pins every block (all present, else BlockNotFoundException and nothing pinned) until Unpin or expiry.</summary>
    PinLease Pin(uint tenant, ReadOnlySpan<BlockHash> hashes, TimeSpan lease);

    bool Unpin(uint tenant, ulong leaseId);

    /// <summary>
    /// Deletes the blocks and their cached descendants; returns how many blocks went. Pinned or in-use blocks stay;
    /// when nothing could go because of them, BlockPinnedException.
    /// </summary>
    ValueTask<int> DeleteAsync(uint tenant, BlockHash[] hashes, CancellationToken cancellationToken);

    StoreStats GetStats(uint tenant);

    /// <summary>Every block the tenant has cached, as Stored events, consistent with the event log up to Sequence.</summary>
    (ulong Sequence, IReadOnlyList<KvEvent> Events) Snapshot(uint tenant);
}

public interface IPutBatch : IDisposable
{
    /// <summary>Stages a block and returns the BlockBytes-long buffer its bytes go to. Throws StoreFullException when there is no room.</summary>
    Memory<byte> Add(BlockHash hash, BlockHash? parent, int depth);

    /// <summary>
    /// Stages a block whose BlockBytes-long bytes are already in memory the caller owns, and keeps unchanged until the
    /// commit ends or the batch is disposed. A store may store them from there without a staging copy.
    /// </summary>
    void AddBorrowed(BlockHash hash, BlockHash? parent, int depth, ReadOnlyMemory<byte> bytes) =>
        bytes.Span.CopyTo(Add(hash, parent, depth).Span);

    /// <summary>Makes every staged block visible at once. Blocks already present stay as they were.</summary>
    ValueTask<PutOutcome> CommitAsync(CancellationToken cancellationToken);
}

/// <summary>NotAdmitted: blocks the tiers' admission policies declined (a caching decision, not an error).</summary>
public readonly record struct PutOutcome(int Stored, int AlreadyPresent, int NotAdmitted = 0);

public readonly record struct PinLease(ulong LeaseId, int Pinned, DateTimeOffset Expires);

/// <summary>A block opened for reading. Dispose ends the read; until then the block cannot change or go away.</summary>
public abstract class ReadLease : IDisposable
{
    public abstract TierKind Tier { get; }

    /// <summary>
    /// The block's bytes, valid until Dispose: at once for a block served in place (host memory); else read from its
    /// tier into one of the node's bounded read buffers, waiting for one to be free (StoreFullException after 30 s), and
    /// BlockNotFoundException if the tier can no longer read it (it failed its checksum and was dropped).
    /// </summary>
    public abstract ValueTask<ReadOnlyMemory<byte>> LoadAsync(CancellationToken cancellationToken);

    public abstract void Dispose();
}

public sealed record TierStatsSnapshot(TierKind Tier, long CapacityBytes, long UsedBytes, long Blocks, long Hits, long Evictions, string Implementation);

public sealed record StoreStats(IReadOnlyList<TierStatsSnapshot> Tiers, long Lookups, long LookupHitBlocks, long LookupMissBlocks,
    long TenantBlocks, long TenantBytes);

public sealed class StoreFullException(string message) : TierException(message);

public sealed class BlockNotFoundException(string message) : TierException(message);

public sealed class BlockPinnedException(string message) : TierException(message);
