using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;

namespace KvFabric.Cluster;

/// <summary>The cluster index over the radix index: (node, worker) names become the index's worker ids.</summary>
public sealed class RadixClusterIndex(RadixIndex index) : IClusterIndex, IDisposable
{
    public RadixIndex Index { get; } = index;

    public ValueTask StoredAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> parent, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken) =>
        Index.EnqueueAsync(IndexEvent.Stored(tenant, Index.WorkerIdOf(node, worker), parent, hashes, tier), cancellationToken);

    public ValueTask RemovedAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken) =>
        Index.EnqueueAsync(IndexEvent.Removed(tenant, Index.WorkerIdOf(node, worker), hashes, tier), cancellationToken);

    public ValueTask ClearedAsync(uint tenant, string node, string worker, TierKind? tier, CancellationToken cancellationToken) =>
        Index.EnqueueAsync(IndexEvent.Cleared(tenant, Index.WorkerIdOf(node, worker), tier), cancellationToken);

    public void Match(uint tenant, ReadOnlySpan<BlockHash> chain, List<LocationMatch> output)
    {
        List<MatchResult> results = new(8);
        Index.Match(tenant, chain, results);
        foreach (MatchResult r in results)
        {
            var (node, worker) = Index.WorkerOf(r.WorkerId);
            output.Add(new LocationMatch(node, worker, r.Gpu, r.Host, r.Ssd));
        }
    }

    public ValueTask RemoveNodeAsync(string node, CancellationToken cancellationToken) => Index.RemoveNodeAsync(node, cancellationToken);

    public Task FlushAsync(CancellationToken cancellationToken) => Index.FlushAsync(cancellationToken);

    public void Dispose() => Index.Dispose();
}
