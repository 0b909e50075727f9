using KvFabric.Tiers.Policies;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Tiers;

public sealed class AdmissionAndFactoryTests
{
    [Fact]
    public void Seen_twice_refuses_a_first_sighting_and_admits_the_second()
    {
        var ssd = new SeenTwiceAdmission(new LruPolicy(4), 4);
        Assert.False(ssd.ShouldAdmit(Info(1)));
        Assert.True(ssd.ShouldAdmit(Info(1)));
        Assert.Equal(1, ssd.RefusedFirstSightings);
        Assert.Equal("lru+seen-twice", ssd.Name);

        // Everything else is the inner policy's.
        ssd.AdmitLeaf(0, 1);
        ssd.AdmitLeaf(1, 2);
        ssd.OnAccess(0);
        Assert.Equal(1, ssd.Victim());
        // A block that was resident once counts as seen.
        ssd.OnRemove(1);
        Assert.True(ssd.ShouldAdmit(Info(2)));
    }

    [Fact]
    public void Seen_twice_also_needs_the_inner_policy_to_admit()
    {
        var ssd = new SeenTwiceAdmission(new RefusingPolicy(), 4);
        Assert.False(ssd.ShouldAdmit(Info(2)));
        Assert.False(ssd.ShouldAdmit(Info(2)));
    }

    private sealed class RefusingPolicy : KvFabric.Tiers.IEvictionPolicy
    {
        private readonly LruPolicy _lru = new(4);
        public string Name => "refusing";
        public bool ShouldAdmit(in KvFabric.Tiers.PolicyBlockInfo info) => false;
        public void OnAdmit(int handle, in KvFabric.Tiers.PolicyBlockInfo info) => _lru.OnAdmit(handle, info);
        public void OnAccess(int handle) => _lru.OnAccess(handle);
        public void OnRemove(int handle) => _lru.OnRemove(handle);
        public void SetEvictable(int handle, bool evictable) => _lru.SetEvictable(handle, evictable);
        public bool TryPickVictim(out int handle) => _lru.TryPickVictim(out handle);
    }

    [Theory]
    [InlineData("lru", "lru")]
    [InlineData(" COST ", "cost")]
    [InlineData("cost-noadmit", "cost-noadmit")]
    [InlineData("cost:history=40000", "cost")]
    [InlineData("lru+seen-twice", "lru+seen-twice")]
    [InlineData("cost:history=5+seen-twice", "cost+seen-twice")]
    public void The_factory_parses_policy_names(string spec, string name) =>
        Assert.Equal(name, PolicyFactory.Create(spec, 16, 512).Name);

    [Fact]
    public void The_factory_applies_the_history_and_rejects_unknown_names()
    {
        var p = Assert.IsType<CostAwarePolicy>(PolicyFactory.Create("cost:history=1234", 16, 512));
        Assert.Equal(1234, p.Options.HistorySightings);
        Assert.Contains("Unknown eviction policy 'fifo'", Assert.Throws<ArgumentException>(() => PolicyFactory.Create("fifo", 16, 512)).Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => PolicyFactory.Create("lru:history=5", 16, 512));
        Assert.Throws<ArgumentException>(() => PolicyFactory.Create("cost:history=0", 16, 512));
        var fixedShare = Assert.IsType<CostAwarePolicy>(PolicyFactory.Create("cost:history=99:probation=0.25", 16, 512));
        Assert.Equal(0.25, fixedShare.Options.ProbationShare);
        Assert.Equal(99, fixedShare.Options.HistorySightings);
        Assert.Equal(4, fixedShare.ProbationTarget);
        Assert.Throws<ArgumentException>(() => PolicyFactory.Create("cost:probation=1.5", 16, 512));
        Assert.Throws<ArgumentException>(() => PolicyFactory.Create("cost:depth=3", 16, 512));
        Assert.False(Assert.IsType<CostAwarePolicy>(PolicyFactory.Create("cost", 16, 512)).Options.WeighDepth);
        Assert.True(Assert.IsType<CostAwarePolicy>(PolicyFactory.Create("cost:depth=on", 16, 512)).Options.WeighDepth);
        Assert.Throws<ArgumentException>(() => PolicyFactory.Create("lru:depth=on", 16, 512));
        // Between a faster and a slower tier a cost policy ranks by recency; lru is lru everywhere.
        Assert.IsType<LruPolicy>(PolicyFactory.Create("cost", 16, 512, middleTier: true));
        Assert.Equal("lru+seen-twice", PolicyFactory.Create("cost+seen-twice", 16, 512, middleTier: true).Name);
        Assert.IsType<CostAwarePolicy>(PolicyFactory.Create("cost", 16, 512, middleTier: false));
    }
}

public sealed class GhostSetTests
{
    [Fact]
    public void Remembers_the_last_capacity_keys_in_fifo_order_and_forgets_a_taken_key()
    {
        var ghost = new GhostSet(3);
        for (ulong k = 1; k <= 4; k++)
            ghost.Add(Key(k));
        Assert.False(ghost.Contains(Key(1)));
        Assert.True(ghost.Contains(Key(2)) && ghost.Contains(Key(4)));
        Assert.True(ghost.TryTake(Key(3)));
        Assert.False(ghost.TryTake(Key(3)));

        // Key 3's old slot must not evict key 3 when it is added again elsewhere.
        ghost.Add(Key(3));   // reuses key 2's slot (the oldest)
        ghost.Add(Key(5));   // reuses key 3's old slot
        Assert.True(ghost.Contains(Key(3)));
        Assert.False(ghost.Contains(Key(2)));
        Assert.Equal(3, ghost.Count);
    }

    [Fact]
    public void A_hit_tells_how_many_keys_were_added_after_the_taken_one()
    {
        var ghost = new GhostSet(4);
        for (ulong k = 1; k <= 4; k++)
            ghost.Add(Key(k));
        Assert.True(ghost.TryTake(Key(4), out long newest));
        Assert.Equal(0, newest);
        Assert.True(ghost.TryTake(Key(1), out long oldest));
        Assert.Equal(3, oldest);
        ghost.Add(Key(2));                // already present: not added again
        ghost.Add(Key(5));                // fills key 1's slot
        Assert.True(ghost.TryTake(Key(2), out long age));
        Assert.Equal(3, age);             // keys 3, 4 and 5 were added after it (4 was taken since, but came later)
        Assert.False(ghost.TryTake(Key(9), out long none));
        Assert.Equal(0, none);
    }
}
