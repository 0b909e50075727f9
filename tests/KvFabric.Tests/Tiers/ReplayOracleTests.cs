using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Tiers;

public sealed class ReplayOracleTests
{
    private static PolicySimulatorCache OneTier(string policy, int blocks, int tokensPerBlock = 4) =>
        new([new SimulatedTier(TierKind.Host, blocks, PolicyFactory.Create(policy, blocks, tokensPerBlock))], BlockBytes);

    [Fact]
    public void Belady_keeps_the_block_used_again_and_bypasses_one_never_used_again()
    {
        // Capacity 1: [1], [2], [1]. MIN keeps 1 (next use: request 2) and does not admit 2 (never used again).
        var trace = Trace(4, [1], [2], [1]);
        var belady = ReplayOracles.Belady(trace, 1);
        Assert.Equal(4, belady.HitTokens);
        Assert.Equal(12, belady.InputTokens);
        Assert.Equal(0, ReplayRunner.Run(trace, OneTier("lru", 1)).HitTokens);
        Assert.Equal(4, ReplayOracles.Infinite(trace).HitTokens);
    }

    [Fact]
    public void Belady_under_prefix_semantics_breaks_ties_toward_the_deeper_block()
    {
        // Capacity 2: [1,2,3], [1,2], [1,2,3]. 1 and 2 are both next used by request 1; 3 only by request 2, so 3 is
        // bypassed. Request 1 hits 2 blocks, request 2 hits 2 (3 is missing), of 8 blocks of 4 tokens.
        var trace = Trace(4, [1, 2, 3], [1, 2], [1, 2, 3]);
        var belady = ReplayOracles.Belady(trace, 2);
        Assert.Equal(16, belady.HitTokens);
        Assert.Equal(0.5, belady.TokenHitRate);
        Assert.Equal(20, ReplayOracles.Infinite(trace).HitTokens);

        // Capacity 3 holds everything: the same as infinite.
        Assert.Equal(20, ReplayOracles.Belady(trace, 3).HitTokens);
    }

    [Fact]
    public void Belady_never_admits_a_child_after_its_parent_was_bypassed()
    {
        // [1,2], [3,4], [3,4], [1,2] with capacity 2: MIN fills with 1 and 2 (next use: request 3), then for 3 and 4
        // (next use: request 2, nearer) it evicts 2 then 1: the deeper block first.
        var trace = Trace(4, [1, 2], [3, 4], [3, 4], [1, 2]);
        var belady = ReplayOracles.Belady(trace, 2);
        Assert.Equal(8, belady.HitTokens); // request 2 hits 3 and 4; request 3 misses
    }

    [Fact]
    public void Hits_count_full_blocks_capped_at_the_input_and_partial_blocks_are_never_stored()
    {
        // 4-token blocks. Request 0: 6 tokens = block 1 (full) and block 2 (2 tokens). Request 1: the same prompt.
        // Request 2: 3 tokens, block 1 only (partial here).
        var trace = new ReplayTrace(4, [(0L, 6, 1, new long[] { 1, 2 }), (1L, 6, 1, new long[] { 1, 2 }), (2L, 3, 1, new long[] { 1 })]);
        Assert.Equal(1, trace.FullBlocks(0));
        Assert.Equal(2, trace.TokensOfBlock(6, 1));
        Assert.Equal(3, trace.HitTokens(3, 1));

        var infinite = ReplayOracles.Infinite(trace);
        // Request 1 reuses block 1 (4 tokens; block 2 was partial, so never stored); request 2 reuses 3 of its 3.
        Assert.Equal(7, infinite.HitTokens);
        Assert.Equal(15, infinite.InputTokens);

        var lru = ReplayRunner.Run(trace, OneTier("lru", 8));
        Assert.Equal(7, lru.HitTokens);
        Assert.Equal(7, lru.HitTokensByTier[0]);
        Assert.Equal(2, lru.RequestsWithHit);
        Assert.Equal(7, ReplayOracles.Belady(trace, 8).HitTokens);
    }

    [Fact]
    public void A_trace_whose_ids_do_not_match_its_lengths_is_refused()
    {
        var e = Assert.Throws<InvalidDataException>(() => new ReplayTrace(4, [(0L, 9, 1, new long[] { 1, 2 })]));
        Assert.Contains("--tokens-per-block", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void On_a_slice_of_the_conversation_trace_lru_and_cost_stay_below_belady_below_infinite()
    {
        var trace = ReplayTrace.Load(ConversationTrace(), 512, maxRequests: 1500);
        Assert.Equal(1500, trace.Count);
        const int blocks = 400;
        var lru = ReplayRunner.Run(trace, OneTier("lru", blocks, 512));
        var cost = ReplayRunner.Run(trace, OneTier("cost", blocks, 512));
        var belady = ReplayOracles.Belady(trace, blocks);
        var infinite = ReplayOracles.Infinite(trace);

        Assert.True(lru.TokenHitRate > 0);
        Assert.True(lru.TokenHitRate <= belady.TokenHitRate, $"lru {lru.TokenHitRate} > belady {belady.TokenHitRate}");
        Assert.True(cost.TokenHitRate <= belady.TokenHitRate, $"cost {cost.TokenHitRate} > belady {belady.TokenHitRate}");
        Assert.True(belady.TokenHitRate <= infinite.TokenHitRate);
        Assert.Equal(infinite.InputTokens, lru.InputTokens);
    }

    [Fact]
    public void The_real_tier_manager_and_the_simulator_agree_on_one_tier()
    {
        var trace = ReplayTrace.Load(ConversationTrace(), 512, maxRequests: 1500);
        const int blocks = 400;
        foreach (string policy in new[] { "lru", "cost" })
        {
            var simulated = ReplayRunner.Run(trace, OneTier(policy, blocks, 512));
            using var manager = new TierManagerReplayCache([new SimulatedTier(TierKind.Host, blocks, PolicyFactory.Create(policy, blocks, 512))], BlockBytes);
            var real = ReplayRunner.Run(trace, manager);
            Assert.Equal(simulated.HitTokens, real.HitTokens);
            Assert.True(manager.Manager.Stats().Tiers[0].UsedBytes <= (long)blocks * BlockBytes);
        }
    }
}
