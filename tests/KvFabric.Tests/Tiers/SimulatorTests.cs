using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Tiers;

public sealed class SimulatorTests
{
    // Chains that walk a random tree: shared roots, branching conversations, repeats: what prefix caches see.
    private static ReplayTrace RandomTreeTrace(int seed, int requests, int tokensPerBlock = 4)
    {
        var rng = new Random(seed);
        var children = new Dictionary<(long Parent, int Choice), long>();
        long nextId = 1;
        var list = new List<(long, int, int, long[])>();
        for (int r = 0; r < requests; r++)
        {
            int length = rng.Next(1, 9);
            var ids = new long[length];
            long parent = 0;
            for (int i = 0; i < length; i++)
            {
                var edge = (parent, rng.Next(i < 2 ? 2 : 4));
                if (!children.TryGetValue(edge, out long id))
                    children[edge] = id = nextId++;
                ids[i] = parent = id;
            }
            int input = length * tokensPerBlock - rng.Next(0, tokensPerBlock);
            list.Add((r, input, 1, ids));
        }
        return new ReplayTrace(tokensPerBlock, list);
    }

    private static PolicySimulatorCache ThreeTiers(string policy, string ssdPolicy, int g, int d, int s) => new(
    [
        new SimulatedTier(TierKind.Gpu, g, PolicyFactory.Create(policy, g, 4)),
        new SimulatedTier(TierKind.Host, d, PolicyFactory.Create(policy, d, 4)),
        new SimulatedTier(TierKind.Ssd, s, PolicyFactory.Create(ssdPolicy, s, 4)),
    ], BlockBytes);

    [Theory]
    [InlineData("lru", "lru", 1)]
    [InlineData("cost", "cost", 2)]
    [InlineData("cost", "cost+seen-twice", 3)]
    [InlineData("lru", "lru+seen-twice", 4)]
    public void Leaf_first_and_the_accounting_hold_after_every_request_across_three_tiers(string policy, string ssd, int seed)
    {
        var trace = RandomTreeTrace(seed, 600);
        var cache = ThreeTiers(policy, ssd, 6, 10, 16);
        var result = ReplayRunner.Run(trace, cache, afterRequest: _ => cache.CheckInvariants());
        Assert.True(result.HitTokens > 0);
        Assert.True(result.HitTokens <= ReplayOracles.Infinite(trace).HitTokens);
        Assert.True(cache.Stats.BytesDemotedFrom[0] > 0, "GPU victims are demoted to DRAM");
        Assert.True(cache.Stats.BytesDemotedFrom[1] > 0, "DRAM victims are demoted to SSD");
        Assert.True(cache.Stats.BlocksDropped > 0, "only the last tier drops");
        Assert.True(cache.ResidentBlocks(0) <= 6 && cache.ResidentBlocks(1) <= 10 && cache.ResidentBlocks(2) <= 16);
        Assert.Equal(result.HitTokens, result.HitTokensByTier.Sum());
    }

    [Theory]
    [InlineData("lru")]
    [InlineData("cost")]
    public void Leaf_first_holds_in_one_tier(string policy)
    {
        var trace = RandomTreeTrace(7, 800);
        var cache = new PolicySimulatorCache([new SimulatedTier(TierKind.Host, 12, PolicyFactory.Create(policy, 12, 4))], BlockBytes);
        ReplayRunner.Run(trace, cache, afterRequest: _ => cache.CheckInvariants());
        Assert.True(cache.ResidentBlocks(0) <= 12);
    }

    [Fact]
    public void A_parent_is_not_evicted_while_its_child_is_cached_and_the_request_in_flight_is_pinned()
    {
        // One tier of 3: [1,2,3] fills it; [4] must evict the leaf 3 (not 1 or 2, which have children), then [5]
        // evicts 2 (now a leaf), never the chain's root first.
        var cache = new PolicySimulatorCache([new SimulatedTier(TierKind.Host, 3, new LruPolicy(3))], BlockBytes);
        cache.Put([Key(1), Key(2), Key(3)]);
        cache.Put([Key(4)]);
        Assert.Equal(-1, cache.TierOf(Key(3)));
        Assert.Equal(0, cache.TierOf(Key(2)));
        cache.Put([Key(5)]);
        Assert.Equal(-1, cache.TierOf(Key(2)));
        Assert.Equal(0, cache.TierOf(Key(1)));
        cache.CheckInvariants();

        // A chain longer than the tier: its own earlier blocks are pinned, so the rest is not stored.
        cache.Put([Key(10), Key(11), Key(12), Key(13)]);
        Assert.Equal(1, cache.Stats.BlocksNotStored);
        cache.CheckInvariants();
    }

    [Fact]
    public void A_hit_in_a_slower_tier_is_promoted_and_the_lookup_reports_where_each_block_was()
    {
        var cache = ThreeTiers("lru", "lru", 1, 1, 4);
        cache.Put([Key(1)]);
        cache.Put([Key(2)]);       // 1 is demoted to DRAM
        cache.Put([Key(3)]);       // 2 to DRAM, 1 to SSD
        var tiers = new TierKind[1];
        Assert.Equal(1, cache.LookupPrefix([Key(1)], tiers));
        Assert.Equal(TierKind.Ssd, tiers[0]);
        cache.Put([Key(1)]);
        Assert.Equal(0, cache.TierOf(Key(1)));
        Assert.True(cache.Stats.BytesPromotedTo[0] > 0);
        cache.CheckInvariants();
    }

    [Fact]
    public void Every_tier_hears_every_use_wherever_the_block_lands()
    {
        var gpu = new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = 1, TokensPerBlock = 4 });
        var ssd = new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = 4, TokensPerBlock = 4 });
        var cache = new PolicySimulatorCache(
        [
            new SimulatedTier(TierKind.Gpu, 1, gpu),
            new SimulatedTier(TierKind.Ssd, 4, ssd),
        ], BlockBytes);
        cache.Put([Key(1)]);       // in the GPU; the SSD's history counts the put too
        cache.Put([Key(1)]);       // a hit
        Assert.Equal(2, ssd.EstimatedFrequency(Key(1)));
        cache.Put([Key(2)]);       // a first sighting: refused by the GPU (1 has a history), it goes to the SSD
        Assert.Equal(1, cache.TierOf(Key(2)));
        Assert.Equal(1, ssd.EstimatedFrequency(Key(2)));
        Assert.Equal(2, ssd.EstimatedFrequency(Key(1)));
        cache.CheckInvariants();
    }
}
