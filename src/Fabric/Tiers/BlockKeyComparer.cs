using System.Runtime.CompilerServices;

namespace KvFabric.Tiers;

// Equality without the generic record-struct path, and a hash through HashCode (seeded randomly per process): clients
// present hash values, so a client crafting colliding keys must not be able to predict the index's buckets.
internal sealed class BlockKeyComparer : IEqualityComparer<BlockKey>
{
    public static readonly BlockKeyComparer Instance = new();

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public bool Equals(BlockKey x, BlockKey y) => x.Hash.Lo == y.Hash.Lo && x.Hash.Hi == y.Hash.Hi && x.Tenant == y.Tenant;

    public int GetHashCode(BlockKey key) => HashCode.Combine(key.Hash.Lo, key.Hash.Hi, key.Tenant);
}
