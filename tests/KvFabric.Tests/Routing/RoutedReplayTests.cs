using KvFabric.Routing;
using KvFabric.Tiers;
using KvFabric.Tiers.Replay;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Routing;

public sealed class RoutedReplayTests
{
    private static readonly Lazy<ReplayTrace> Slice = new(() => ReplayTrace.Load(ConversationTrace(), 512, maxRequests: 1500));

    // 4 workers of 1,000 blocks on the 1,500-request slice: small enough that where a request goes matters.
    private static readonly RoutedReplayOptions Cluster = new() { Workers = 4, Tiers = [TierKind.Host], CapacityBlocks = [1000], EvictionPolicy = "lru" };

    [Fact]
    public void Kv_aware_routing_hits_more_than_round_robin_and_random_on_the_conversation_slice()
    {
        var kv = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.KvAware);
        var rr = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.RoundRobin);
        var random = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.Random);

        Assert.Equal(1500, kv.Requests);
        Assert.True(rr.TokenHitRate > 0, $"round-robin {rr.TokenHitRate}");
        Assert.True(kv.TokenHitRate > rr.TokenHitRate, $"kv-aware {kv.TokenHitRate} <= round-robin {rr.TokenHitRate}");
        Assert.True(kv.TokenHitRate > random.TokenHitRate, $"kv-aware {kv.TokenHitRate} <= random {random.TokenHitRate}");
        Assert.True(kv.BlockHitRate > rr.BlockHitRate && kv.BlockHitRate > random.BlockHitRate);

        // Every request is counted once, on one worker; round-robin spreads them exactly.
        Assert.Equal(1500, kv.RequestsPerWorker.Sum());
        Assert.Equal([375, 375, 375, 375], rr.RequestsPerWorker);
        Assert.Equal(1.0, rr.MaxOverMeanRequests);
    }

    [Fact]
    public void The_routers_expected_hit_is_the_hit_the_chosen_worker_gets()
    {
        var kv = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.KvAware);
        Assert.True(kv.ExpectedHitBlocks > 0);
        Assert.Equal(kv.ExpectedHitBlocks, kv.ActualHitBlocks);
        Assert.Equal(0, kv.ExpectedActualMismatches);
        Assert.Equal(kv.HitBlocks, kv.ActualHitBlocks);
        Assert.Equal(kv.HitBlocks * 512, kv.HitTokens);
    }

    [Fact]
    public void The_same_seed_gives_the_same_result_and_another_seed_another_spread()
    {
        var a = RoutedReplay.Run(Slice.Value, Cluster with { Seed = 7 }, RoutePolicy.Random);
        var b = RoutedReplay.Run(Slice.Value, Cluster with { Seed = 7 }, RoutePolicy.Random);
        Assert.Equal(a.HitTokens, b.HitTokens);
        Assert.Equal(a.RequestsPerWorker, b.RequestsPerWorker);
        Assert.Equal(a.TtftMs, b.TtftMs);

        var other = RoutedReplay.Run(Slice.Value, Cluster with { Seed = 8 }, RoutePolicy.Random);
        Assert.NotEqual(a.RequestsPerWorker, other.RequestsPerWorker);

        // The KV-aware policy has no randomness at all: two runs agree to the request.
        var kv1 = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.KvAware);
        var kv2 = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.KvAware);
        Assert.Equal(kv1.HitTokens, kv2.HitTokens);
        Assert.Equal(kv1.RequestsPerWorker, kv2.RequestsPerWorker);
    }

    [Fact]
    public void Without_the_load_term_overlap_routing_hot_spots()
    {
        // Ties go to the first worker, and then it holds the most: everything lands there.
        var overlap = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.KvOverlap);
        var kv = RoutedReplay.Run(Slice.Value, Cluster, RoutePolicy.KvAware);
        Assert.Equal(4.0, overlap.MaxOverMeanRequests);
        Assert.True(kv.MaxOverMeanRequests < 1.25, $"kv-aware imbalance {kv.MaxOverMeanRequests}");
        Assert.True(kv.MeanTtftMs < overlap.MeanTtftMs);
    }

    [Fact]
    public void A_request_goes_to_the_worker_holding_its_prefix_unless_that_worker_is_busy()
    {
        // Two workers, 512-token blocks, 1,000 prefill tokens/s: a block of prefill is 512 ms of work.
        var opts = new RoutedReplayOptions { Workers = 2, Tiers = [TierKind.Host], CapacityBlocks = [100], PrefillTokensPerSecond = 1000 };
        // r0 at t=0: [1,2,3,4] -> w0 (tie). r1 at t=10 s: [1,2,3,4,5] -> w0 (4 blocks held, idle).
        // r2 at t=10.1 s: [1,2,3,4,6] -> w0 holds 4 blocks but is busy with r1's 1 block (~0.41 s left = 0.8 blocks):
        // cost on w0 = 5 - 4 + 0.8 < 5 on w1, so w0 still. r3 at t=10.2 s: [9,9x..] a new chain of 4 blocks: w1 (idle).
        var trace = new ReplayTrace(512,
        [
            (0L, 4 * 512, 1, new long[] { 1, 2, 3, 4 }),
            (10_000L, 5 * 512, 1, new long[] { 1, 2, 3, 4, 5 }),
            (10_100L, 5 * 512, 1, new long[] { 1, 2, 3, 4, 6 }),
            (10_200L, 4 * 512, 1, new long[] { 90, 91, 92, 93 }),
        ]);
        var kv = RoutedReplay.Run(trace, opts, RoutePolicy.KvAware);
        Assert.Equal([3, 1], kv.RequestsPerWorker);
        Assert.Equal(8, kv.HitBlocks);
        Assert.Equal(8.0 / 18, kv.BlockHitRate, 12);

        // With the same prefix but a worker backed up by far more than the prefix saves, the request goes elsewhere.
        var busy = new ReplayTrace(512,
        [
            (0L, 40 * 512, 1, Enumerable.Range(100, 40).Select(i => (long)i).ToArray()),
            (100L, 2 * 512, 1, new long[] { 100, 7 }),
        ]);
        var spread = RoutedReplay.Run(busy, opts, RoutePolicy.KvAware);
        Assert.Equal([1, 1], spread.RequestsPerWorker);
        Assert.Equal(0, spread.HitBlocks);
    }
}
