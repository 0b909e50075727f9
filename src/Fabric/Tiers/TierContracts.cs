using KvFabric.Blocks;

namespace KvFabric.Tiers;

// The contract between the tier manager and the stores that hold its bytes. A store keeps whole blocks and exact
// byte accounting; it never decides placement or eviction (that is the tier manager's job).

public enum TierKind : byte
{
    Gpu = 0,
    Host = 1,
    Ssd = 2,
}

// A block's key inside one sidecar: the tenant it belongs to and its chained hash. Two tenants never share a block,
// even if one of them presents the other's hash value.
public readonly record struct BlockKey(uint Tenant, BlockHash Hash)
{
    public override string ToString() => $"{Tenant}:{Hash}";
}

// What a store persists next to the bytes, so that a durable tier can rebuild the chain structure after a restart.
// Depth is the block's position in its chain (0 for a chain's first block); Parent is meaningless when Depth == 0.
public readonly record struct BlockMeta(BlockHash Parent, int Depth, int Length);

public class TierException : Exception
{
    public TierException(string message) : base(message) { }
    public TierException(string message, Exception inner) : base(message, inner) { }
}

// Thrown when stored bytes fail their checksum on read. The store has already dropped the block: it is absent now.
public sealed class BlockCorruptException : TierException
{
    public BlockCorruptException(BlockKey key, TierKind tier, string detail)
        : base($"Block {key} in the {tier} tier failed its integrity check ({detail}); it was dropped and will be refetched or recomputed.")
    {
        Key = key;
        Tier = tier;
    }

    public BlockKey Key { get; }
    public TierKind Tier { get; }
}

public interface IBlockStore : IDisposable
{
    TierKind Kind { get; }
    long CapacityBytes { get; }
    long UsedBytes { get; }
    int Count { get; }

    bool Contains(BlockKey key);

    // Stores a whole block. Returns false when there is no room (the caller evicts first); throws TierException on an
    // I/O failure (disk full, device error), leaving nothing partial behind. For a durable store, a true result means the
    // block survives a crash from that moment on.
    ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default);

    // Reads a whole block into destination (which must be at least the block's length); false when absent.
    // Throws BlockCorruptException when the bytes fail their checksum.
    ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default);

    // Removes a block from this process at once (true when it was stored). For a durable store the removal may become
    // durable later (the SSD store's next group commit, or once a full file system has room again): a crash before
    // then can bring the block back, intact, and a restart lists it in Recovered.
    bool Remove(BlockKey key);
}

// A store whose blocks survive a restart: after opening, Recovered lists every block that is readable.
public interface IDurableBlockStore : IBlockStore
{
    IReadOnlyCollection<KeyValuePair<BlockKey, BlockMeta>> Recovered { get; }
}
