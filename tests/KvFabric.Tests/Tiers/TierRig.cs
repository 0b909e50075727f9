using KvFabric.Tiers;

namespace KvFabric.Tests.Tiers;

// A tier manager over test-double stores and policies: `blocks` per tier, each block `BlockBytes` long.
internal sealed class TierRig : IAsyncDisposable
{
    public const int BlockBytes = 64;

    public TierRig(int[] blocksPerTier, WritePolicy write = WritePolicy.WriteBack, bool promote = false,
        Func<TierOptions, int, TierOptions>? configure = null, Func<TierManagerOptions, TierManagerOptions>? configureManager = null)
    {
        var kinds = new[] { TierKind.Gpu, TierKind.Host, TierKind.Ssd }[(3 - blocksPerTier.Length)..];
        var tiers = new List<TierOptions>();
        for (int i = 0; i < blocksPerTier.Length; i++)
        {
            var store = new InMemoryTestStore(kinds[i], (long)blocksPerTier[i] * BlockBytes);
            var policy = new TestLruPolicy();
            Stores.Add(store);
            Policies.Add(policy);
            var o = new TierOptions { Store = store, Policy = policy };
            tiers.Add(configure?.Invoke(o, i) ?? o);
        }
        var options = new TierManagerOptions
        {
            Tiers = tiers,
            WritePolicy = write,
            PromoteOnHit = promote,
            Events = Sink,
            Time = Time,
        };
        Manager = new TierManager(configureManager?.Invoke(options) ?? options);
    }

    public TierManager Manager { get; }
    public List<InMemoryTestStore> Stores { get; } = [];
    public List<TestLruPolicy> Policies { get; } = [];
    public RecordingSink Sink { get; } = new();
    public ManualTime Time { get; } = new();

    public ValueTask<PutResult> Put(int first, int count, int? parent = null) =>
        Manager.PutAsync(0, parent is { } p ? TierTestData.Hash(p) : null, TierTestData.Chain(first, count, BlockBytes));

    public int Residency(int n) => Manager.Residency(new BlockKey(0, TierTestData.Hash(n)));

    public async Task<(int Read, byte[][] Buffers)> Get(int first, int count)
    {
        var buffers = Enumerable.Range(0, count).Select(_ => new byte[BlockBytes]).ToArray();
        int read = await Manager.GetAsync(0, TierTestData.Hashes(first, count), buffers.Select(b => (Memory<byte>)b).ToArray());
        return (read, buffers);
    }

    public ValueTask DisposeAsync() => Manager.DisposeAsync();
}
