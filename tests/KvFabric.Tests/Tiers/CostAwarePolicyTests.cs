using KvFabric.Tiers.Policies;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Tiers;

public sealed class CostAwarePolicyTests
{
    private static CostAwarePolicy Policy(int blocks, bool admission = true, bool weighDepth = false) =>
        new(new CostAwareOptions { ExpectedBlocks = blocks, TokensPerBlock = 512, Admission = admission, WeighDepth = weighDepth });

    // Key 1 enters probation under handle 0, is evicted from it, and comes back: a probation ghost hit (p grows by at
    // least one block), after which key 1, seen twice, is protected under handle 0 (not yet evictable).
    private static void MissOnProbationGhost(CostAwarePolicy p)
    {
        p.AdmitLeaf(0, 1);
        Assert.Equal(0, p.Victim());
        p.OnRemove(0);
        p.OnAdmit(0, Info(1));
    }

    [Fact]
    public void Recompute_cost_is_the_blocks_tokens_by_default_and_grows_with_depth_when_weighed()
    {
        var flat = Policy(4);
        Assert.Equal(512, flat.RecomputeCost(0), 9);
        Assert.Equal(512, flat.RecomputeCost(100), 9);
        var p = Policy(4, weighDepth: true);
        // T · (1 + (d + ½) · T / A) with T = 512, A = 32768.
        Assert.Equal(512 * (1 + 0.5 * 512 / 32768.0), p.RecomputeCost(0), 9);
        Assert.Equal(512 * (1 + 10.5 * 512 / 32768.0), p.RecomputeCost(10), 9);
        Assert.True(p.RecomputeCost(100) > p.RecomputeCost(10));
        Assert.Equal(p.RecomputeCost(3) / (BlockBytes / (double)(1 << 20)), p.Value(3, BlockBytes), 9);
    }

    // The manager may pick a victim and then not evict it (a reader took it during its copy, a pin landed): the pick alone
    // must neither put the block in a ghost (its next use would adapt p as if it had been a miss) nor raise the clock.
    [Fact]
    public void A_victim_picked_but_not_evicted_leaves_no_ghost_and_does_not_age_the_others()
    {
        var p = Policy(8);
        p.AdmitLeaf(0, 1);
        double clock = p.Clock, target = p.ProbationTarget;
        Assert.Equal(0, p.Victim());
        Assert.Equal(clock, p.Clock);
        p.OnSighting(Info(1)); // used again while still resident: no ghost hit
        p.OnAccess(0);
        Assert.Equal(target, p.ProbationTarget);

        // Carried out, the same pick is an eviction: the clock rises to the victim's priority and a use of it afterwards
        // is a probation ghost hit (p grows).
        p.AdmitLeaf(1, 2);
        Assert.Equal(1, p.Victim());
        double priority = p.PriorityOf(1);
        p.OnRemove(1);
        Assert.Equal(priority, p.Clock);
        p.OnSighting(Info(2));
        Assert.True(p.ProbationTarget > target);
    }

    [Fact]
    public void A_block_seen_before_enters_protected_and_a_hit_moves_a_first_sighting_there()
    {
        var p = Policy(8);
        p.AdmitLeaf(0, 1);
        Assert.False(p.IsProtected(0));
        Assert.Equal(1, p.ProbationCount);
        p.OnAccess(0);
        Assert.True(p.IsProtected(0));
        Assert.Equal(0, p.ProbationCount);

        // History outlives residency: the same key admitted again (after leaving) is protected at once.
        p.AdmitLeaf(1, 2);
        p.OnRemove(1);
        p.AdmitLeaf(1, 2);
        Assert.True(p.IsProtected(1));
        Assert.Equal(2, p.EstimatedFrequency(Key(2)));
    }

    [Fact]
    public void Probation_goes_first_while_it_is_over_its_target_then_the_least_valuable_protected_block()
    {
        var p = Policy(8, weighDepth: true);
        p.AdmitLeaf(0, 10, depth: 0);   // protected, seen 3 times
        p.OnAccess(0);
        p.OnAccess(0);
        p.AdmitLeaf(1, 11, depth: 0);   // protected, seen twice
        p.OnAccess(1);
        p.AdmitLeaf(2, 12, depth: 40);  // protected, seen twice, deeper: costs more to recompute
        p.OnAccess(2);
        p.AdmitLeaf(3, 13);             // probation
        Assert.Equal(0.0, p.ProbationTarget);

        Assert.Equal(3, p.Victim());
        p.OnRemove(3);
        Assert.Equal(1, p.Victim());
        double clock = p.Clock;
        Assert.True(clock > 0, "the clock rises to the victim's priority");
        p.OnRemove(1);
        // Seen three times at depth 0 (3 · 516 per MiB) is worth less than twice at depth 40 (2 · 835): depth outweighs
        // one extra sighting here.
        Assert.Equal(0, p.Victim());
        Assert.True(p.Clock >= clock);
    }

    [Fact]
    public void A_first_sighting_worth_less_than_the_protected_victim_is_refused_while_probation_has_no_share()
    {
        var p = Policy(2);
        p.AdmitLeaf(0, 1);
        p.OnAccess(0);
        p.AdmitLeaf(1, 2);
        p.OnAccess(1);
        Assert.False(p.ShouldAdmit(Info(3)));
        // Seen before now: it has a history, so it enters (protected).
        Assert.True(p.ShouldAdmit(Info(3)));
        // Without admission everything enters.
        var open = Policy(2, admission: false);
        open.AdmitLeaf(0, 1);
        open.OnAccess(0);
        Assert.True(open.ShouldAdmit(Info(4)));
    }

    [Fact]
    public void Should_admit_and_the_admit_that_follows_count_one_sighting()
    {
        var p = Policy(4);
        Assert.True(p.ShouldAdmit(Info(5)));
        p.OnAdmit(0, Info(5));
        Assert.Equal(1, p.EstimatedFrequency(Key(5)));
        Assert.False(p.IsProtected(0));
    }

    [Fact]
    public void Once_uses_are_reported_admissions_and_accesses_no_longer_count_as_sightings()
    {
        var p = Policy(4);
        p.OnSighting(Info(7));            // a put of key 7 placed in another tier
        p.OnSighting(Info(7));            // and a later hit there
        p.OnAdmit(0, Info(7));            // demoted here: a move, not a use
        Assert.Equal(2, p.EstimatedFrequency(Key(7)));
        Assert.True(p.IsProtected(0));    // it arrives with its history
        p.OnAccess(0);
        Assert.Equal(2, p.EstimatedFrequency(Key(7)));
        p.OnSighting(Info(8));
        Assert.True(p.ShouldAdmit(Info(8)));
        p.OnAdmit(1, Info(8));
        Assert.Equal(1, p.EstimatedFrequency(Key(8)));
        Assert.False(p.IsProtected(1));
    }

    [Fact]
    public void A_miss_on_a_block_probation_evicted_grows_its_share()
    {
        var p = Policy(4);
        MissOnProbationGhost(p);
        Assert.True(p.ProbationTarget >= 1);
        Assert.True(p.IsProtected(0));
    }

    [Fact]
    public void A_miss_on_a_block_probation_evicted_long_ago_does_not_grow_its_share()
    {
        // 16 blocks: while p is 0, only the newest 16 / 4 = 4 probation ghosts are within reach.
        var p = Policy(16);
        for (ulong k = 1; k <= 6; k++)
        {
            p.AdmitLeaf(0, k);
            Assert.Equal(0, p.Victim());
            p.OnRemove(0);
        }
        p.OnAdmit(0, Info(1));            // ghost age 5: out of reach
        Assert.Equal(0.0, p.ProbationTarget);
        Assert.True(p.IsProtected(0));    // still seen before: it enters protected
        p.OnAdmit(1, Info(6));            // ghost age 0: a probation of one block would have kept it
        Assert.True(p.ProbationTarget >= 1);
    }

    [Fact]
    public void A_miss_on_a_block_protected_evicted_shrinks_probation_by_its_frequency_and_a_fixed_share_does_not_move()
    {
        var p = Policy(4);
        MissOnProbationGhost(p);
        p.SetEvictable(0, true);
        double grown = p.ProbationTarget;
        Assert.True(grown >= 1);
        Assert.Equal(0, p.Victim());      // probation is empty: protected gives its victim, remembered in its ghost
        p.OnRemove(0);
        p.OnAdmit(0, Info(1));            // a miss on it: protected was too small
        Assert.True(p.ProbationTarget < grown);

        var fixedShare = new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = 4, ProbationShare = 0.5 });
        MissOnProbationGhost(fixedShare);
        Assert.Equal(2, fixedShare.ProbationTarget);
    }

    [Fact]
    public void A_first_sighting_cannot_displace_a_protected_block_while_probation_holds_only_pinned_blocks()
    {
        var p = Policy(4);
        MissOnProbationGhost(p);
        p.SetEvictable(0, true);
        p.OnAccess(0);                    // seen three times
        p.OnAdmit(1, Info(2));            // probation, pinned by the put in flight
        Assert.True(p.ProbationTarget >= 1);
        Assert.False(p.ShouldAdmit(Info(3)));
        p.SetEvictable(1, true);          // the put ended: probation has its own victim again
        Assert.True(p.ShouldAdmit(Info(4)));
    }

    [Fact]
    public void Only_evictable_blocks_are_victims_and_handles_are_reused()
    {
        var p = Policy(4);
        p.OnAdmit(0, Info(0));
        p.OnAdmit(1, Info(1));
        Assert.False(p.TryPickVictim(out _));
        p.SetEvictable(1, true);
        p.SetEvictable(1, false);
        p.SetEvictable(1, true);
        Assert.Equal(1, p.Victim());
        p.OnRemove(1);
        p.AdmitLeaf(1, 9);
        Assert.Equal(1, p.EvictableCount);
        Assert.Throws<InvalidOperationException>(() => p.OnAdmit(1, Info(10)));
        Assert.Throws<InvalidOperationException>(() => p.OnAccess(3));
    }
}
