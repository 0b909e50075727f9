using KvFabric.Tiers.Policies;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Tiers;

public sealed class LruPolicyTests
{
    [Fact]
    public void Evicts_the_least_recently_used_evictable_block()
    {
        var lru = new LruPolicy(4);
        for (int h = 0; h < 4; h++)
            lru.AdmitLeaf(h, (ulong)h);
        lru.OnAccess(0);
        lru.OnAccess(2);

        Assert.Equal(1, lru.Victim());
        lru.OnRemove(1);
        Assert.Equal(3, lru.Victim());
        lru.OnRemove(3);
        Assert.Equal(0, lru.Victim());
        lru.OnRemove(0);
        Assert.Equal(2, lru.Victim());
        lru.OnRemove(2);
        Assert.False(lru.TryPickVictim(out _));
        Assert.True(lru.ShouldAdmit(Info(9)));
    }

    [Fact]
    public void Skips_blocks_that_are_not_evictable_and_restores_their_place_when_they_become_evictable()
    {
        var lru = new LruPolicy(4);
        for (int h = 0; h < 4; h++)
            lru.AdmitLeaf(h, (ulong)h);
        lru.SetEvictable(0, false);
        lru.SetEvictable(2, false);
        Assert.Equal(1, lru.Victim());

        // Toggling many times changes nothing: order is by last use, not by when it became evictable.
        for (int i = 0; i < 100; i++)
        {
            lru.SetEvictable(0, true);
            lru.SetEvictable(0, true);
            lru.SetEvictable(0, false);
        }
        lru.SetEvictable(0, true);
        lru.SetEvictable(2, true);
        Assert.Equal(0, lru.Victim());
        Assert.Equal(4, lru.EvictableCount);
    }

    [Fact]
    public void A_new_block_is_not_evictable_until_told_and_an_access_while_pinned_counts()
    {
        var lru = new LruPolicy(2);
        lru.OnAdmit(0, Info(0));
        Assert.False(lru.TryPickVictim(out _));
        lru.AdmitLeaf(1, 1);
        lru.OnAccess(0);
        lru.SetEvictable(0, true);
        Assert.Equal(1, lru.Victim());
    }

    [Fact]
    public void A_removed_handle_can_be_reused_and_grows_past_the_hint()
    {
        var lru = new LruPolicy(1);
        lru.AdmitLeaf(0, 0);
        lru.OnRemove(0);
        lru.AdmitLeaf(0, 7);
        lru.AdmitLeaf(100, 8);
        Assert.Equal(0, lru.Victim());
        Assert.Equal(2, lru.ResidentCount);
    }

    [Fact]
    public void Misuse_names_the_handle()
    {
        var lru = new LruPolicy(2);
        Assert.Contains("handle 1 is not resident", Assert.Throws<InvalidOperationException>(() => lru.OnAccess(1)).Message, StringComparison.Ordinal);
        lru.OnAdmit(1, Info(1));
        Assert.Contains("already resident", Assert.Throws<InvalidOperationException>(() => lru.OnAdmit(1, Info(2))).Message, StringComparison.Ordinal);
        Assert.Throws<InvalidOperationException>(() => lru.SetEvictable(5, true));
        Assert.Throws<ArgumentOutOfRangeException>(() => lru.OnAdmit(-1, Info(3)));
    }
}
