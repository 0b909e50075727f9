using KvFabric.Blocks;

namespace KvFabric.Tiers.Replay;

/// <summary>
/// The replay's cache under test when it is the real TierManager: one tier per SimulatedTier, over key-only stores (no
/// bytes move). A request looks up its prefix, reads the hit blocks (a hit in a slower tier queues a promotion, which is
/// awaited so the replay stays deterministic), then puts its whole chain.
/// </summary>
public sealed class TierManagerReplayCache : IReplayCache, IDisposable
{
    private readonly TierManager _manager;
    private readonly int _blockBytes;
    private readonly byte[] _bytes;
    private readonly ReplayCacheStats _stats;
    private BlockHash[] _hashes = new BlockHash[256];
    private BlockPut[] _puts = new BlockPut[256];
    private Memory<byte>[] _destinations = new Memory<byte>[256];

    public TierManagerReplayCache(IReadOnlyList<SimulatedTier> tiers, int blockBytes, string? name = null)
    {
        ArgumentNullException.ThrowIfNull(tiers);
        ArgumentOutOfRangeException.ThrowIfLessThan(blockBytes, 1);
        _blockBytes = blockBytes;
        _bytes = new byte[blockBytes];
        _manager = new TierManager(new TierManagerOptions
        {
            Tiers = tiers.Select(t => new TierOptions
            {
                Store = new KeyOnlyBlockStore(t.Kind, (long)t.CapacityBlocks * blockBytes),
                Policy = t.Policy,
            }).ToArray(),
        });
        Tiers = tiers.Select(t => t.Kind).ToArray();
        Name = name ?? string.Join(",", tiers.Select(t => t.Policy.Name).Distinct());
        _stats = new ReplayCacheStats(tiers.Count);
    }

    public string Name { get; }
    public IReadOnlyList<TierKind> Tiers { get; }
    public TierManager Manager => _manager;

    public ReplayCacheStats Stats
    {
        get
        {
            TierManagerStats s = _manager.Stats();
            for (int t = 0; t < s.Tiers.Count; t++)
            {
                TierStats ts = s.Tiers[t];
                _stats.BlocksWritten[t] = ts.BytesIn / _blockBytes;
                _stats.BytesPromotedTo[t] = ts.PromotionsIn * (long)_blockBytes;
                _stats.Bypassed[t] = ts.AdmissionRefusals;
                if (t > 0)
                    _stats.BytesDemotedFrom[t - 1] = ts.DemotionsIn * (long)_blockBytes;
            }

            _stats.BlocksDropped = s.Tiers[^1].Evictions;
            return _stats;
        }
    }

    public int LookupPrefix(ReadOnlySpan<BlockKey> chain, Span<TierKind> tierOf)
    {
        Span<BlockHash> hashes = Hashes(chain);
        return _manager.Lookup(chain.IsEmpty ? 0 : chain[0].Tenant, hashes, tierOf).Matched;
    }

    public void Put(ReadOnlySpan<BlockKey> chain)
    {
        if (chain.IsEmpty)
            return;
        uint tenant = chain[0].Tenant;
        Span<BlockHash> hashes = Hashes(chain);
        int matched = _manager.Lookup(tenant, hashes).Matched;
        if (matched > 0 && Tiers.Count > 1)
        {
            for (int i = 0; i < matched; i++)
                _destinations[i] = _bytes;
            _manager.GetAsync(tenant, _hashes.AsMemory(0, matched), new ArraySegment<Memory<byte>>(_destinations, 0, matched))
                .AsTask().GetAwaiter().GetResult();
            _manager.WhenPromotionsIdleAsync().GetAwaiter().GetResult();
        }

        if (_puts.Length < chain.Length)
            _puts = new BlockPut[Math.Max(chain.Length, _puts.Length * 2)];
        for (int i = 0; i < chain.Length; i++)
            _puts[i] = new BlockPut(hashes[i], _bytes);
        PutResult r = _manager.PutAsync(tenant, null, new ArraySegment<BlockPut>(_puts, 0, chain.Length)).AsTask().GetAwaiter().GetResult();
        _stats.BlocksNotStored += r.NotStored;
    }

    private Span<BlockHash> Hashes(ReadOnlySpan<BlockKey> chain)
    {
        if (_hashes.Length < chain.Length)
        {
            _hashes = new BlockHash[Math.Max(chain.Length, _hashes.Length * 2)];
            _destinations = new Memory<byte>[_hashes.Length];
        }

        for (int i = 0; i < chain.Length; i++)
            _hashes[i] = chain[i].Hash;
        return _hashes.AsSpan(0, chain.Length);
    }

    public void Dispose() => _manager.Dispose();
}
