using KvFabric.Blocks;
using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

public sealed class TierManagerTests
{
    // Residency bits by tier position (the rig names a two-tier setup Host and Ssd, but bit 0 is still the first tier).
    private const int Gpu = 1, Host = 2, Ssd = 4;

    [Fact]
    public async Task A_put_chain_is_found_by_lookup_and_read_back_from_the_top_tier()
    {
        await using var rig = new TierRig([4, 4, 4]);
        var r = await rig.Put(0, 3);
        Assert.Equal(new PutResult(PutStatus.Stored, 3, 0, 0, null), r);

        var tiers = new TierKind[4];
        var look = rig.Manager.Lookup(0, Hashes(0, 4), tiers);
        Assert.Equal(new LookupResult(3, 3), look);
        Assert.Equal([TierKind.Gpu, TierKind.Gpu, TierKind.Gpu], tiers[..3]);

        var (read, buffers) = await rig.Get(0, 4);
        Assert.Equal(3, read);
        for (int i = 0; i < 3; i++)
            Assert.Equal(Bytes(i, TierRig.BlockBytes), buffers[i]);
        var stats = rig.Manager.Stats();
        Assert.Equal(3, stats.Tiers[0].Hits);
        Assert.Equal(1, stats.Misses);
        Assert.Equal(3 * TierRig.BlockBytes, stats.Tiers[0].UsedBytes);

        Assert.Equal([1UL, 2, 3], rig.Sink.Events.Select(e => e.Sequence));
        Assert.All(rig.Sink.Events, e => Assert.Equal((KvEventKind.Stored, TierKind.Gpu), (e.Kind, e.Tier)));
        Assert.Equal(Hash(0), rig.Sink.Events[1].Parent);
        Assert.Equal(1, rig.Sink.Events[1].Depth);
        Assert.False(rig.Sink.Events[0].HasParent);
    }

    [Fact]
    public async Task Putting_a_cached_block_again_only_touches_it()
    {
        await using var rig = new TierRig([4]);
        await rig.Put(0, 2);
        var again = await rig.Put(0, 3);
        Assert.Equal(new PutResult(PutStatus.Stored, 1, 2, 0, null), again);
        Assert.Equal(3, rig.Stores[0].Writes);
        Assert.Equal(3, rig.Sink.Events.Count);
    }

    [Fact]
    public async Task Eviction_demotes_leaves_first_down_the_tiers_and_drops_only_at_the_last()
    {
        await using var rig = new TierRig([2, 2, 2]);
        // A block never lands above its parent, and the parent being extended cannot move: the GPU keeps the prefix.
        await rig.Put(0, 4);
        Assert.Equal([Gpu, Gpu, Host, Host], Enumerable.Range(0, 4).Select(rig.Residency));
        await rig.Put(4, 2, parent: 3);
        Assert.Equal([Gpu, Gpu, Host, Host, Ssd, Ssd], Enumerable.Range(0, 6).Select(rig.Residency));
        var r = await rig.Put(6, 1, parent: 5);
        // Every SSD block is a parent of a cached block or the parent being extended: nothing can leave. Nothing changed.
        Assert.Equal(new PutResult(PutStatus.ResourceExhausted, 0, 0, 1, r.Detail), r);
        Assert.Contains("RESOURCE_EXHAUSTED", Assert.Throws<TierResourceExhaustedException>(r.ThrowIfIncomplete).Message);
        Assert.Equal(6, rig.Sink.Events.Count);

        // A new root needs a GPU slot: block 1 (its child sits in the host tier) must go down, but the host tier only
        // has room once 3 goes down to the SSD tier, which only has room once the leaf 5 is dropped.
        await rig.Put(100, 1);
        Assert.Equal([Gpu, Host, Host, Ssd, Ssd, 0], Enumerable.Range(0, 6).Select(rig.Residency));
        Assert.Equal(Gpu, rig.Residency(100));
        var stats = rig.Manager.Stats();
        Assert.Equal([2, 2, 2], stats.Tiers.Select(t => t.Blocks));
        Assert.Equal([1L, 1, 1], stats.Tiers.Select(t => t.Evictions));
        Assert.Equal([0L, 1, 1], stats.Tiers.Select(t => t.DemotionsIn));
        Assert.Equal([KvEventKind.Removed, TierKind.Ssd, Hash(5)], rig.Sink.Events[6] is var e ? new object[] { e.Kind, e.Tier, e.Block } : null);
    }

    [Fact]
    public async Task A_parent_is_never_evicted_while_a_child_is_in_the_same_or_a_faster_tier()
    {
        await using var rig = new TierRig([3, 3]);
        await rig.Put(0, 3);
        // Every put of a new root needs one GPU slot; victims must be leaves: 2, then 1, then 0.
        await rig.Put(10, 1);
        Assert.Equal([Gpu, Gpu, Host], new[] { 0, 1, 2 }.Select(rig.Residency));
        await rig.Put(11, 1);
        Assert.Equal([Gpu, Host, Host], new[] { 0, 1, 2 }.Select(rig.Residency));
        await rig.Put(12, 1);
        Assert.Equal([Host, Host, Host], new[] { 0, 1, 2 }.Select(rig.Residency));
    }

    [Fact]
    public async Task Pinned_blocks_stay_until_unpinned_or_their_lease_expires()
    {
        await using var rig = new TierRig([2]);
        await rig.Put(0, 2);
        Assert.Equal(2, rig.Manager.Pin(0, Hashes(0, 2), TimeSpan.FromMinutes(1)));
        int events = rig.Sink.Events.Count;
        var r = await rig.Put(10, 1);
        Assert.Equal(PutStatus.ResourceExhausted, r.Status);
        Assert.Equal(events, rig.Sink.Events.Count); // nothing changed
        Assert.Equal(2 * TierRig.BlockBytes, rig.Manager.Stats().Tiers[0].UsedBytes);

        rig.Time.Advance(TimeSpan.FromMinutes(2));
        Assert.Equal(PutStatus.Stored, (await rig.Put(10, 1)).Status);
        Assert.Equal(0, rig.Residency(1)); // the leaf was dropped

        Assert.Equal(1, rig.Manager.Pin(0, Hashes(0, 1), TimeSpan.FromHours(1)));
        Assert.Equal(1, rig.Manager.Unpin(0, Hashes(0, 1)));
        Assert.Equal(PutStatus.Stored, (await rig.Put(11, 1)).Status);
    }

    [Fact]
    public async Task Blocks_in_use_by_a_transfer_are_not_evicted_until_the_scope_is_disposed()
    {
        await using var rig = new TierRig([2]);
        await rig.Put(0, 2);
        using (var use = rig.Manager.Acquire(0, Hashes(0, 3)))
        {
            Assert.Equal(2, use.Count);
            Assert.Equal(PutStatus.ResourceExhausted, (await rig.Put(10, 1)).Status);
            Assert.Equal(new DeleteResult(0, 2), await rig.Manager.DeleteAsync(0, Hash(0)));
        }
        Assert.Equal(PutStatus.Stored, (await rig.Put(10, 1)).Status);
    }

    [Fact]
    public async Task A_hit_in_a_slower_tier_is_promoted_in_the_background_and_keeps_its_slower_copy()
    {
        await using var rig = new TierRig([2, 4], promote: true);
        await rig.Put(0, 2);
        await rig.Put(10, 2); // 0 and 1 go to the host tier
        Assert.Equal([Host, Host], new[] { 0, 1 }.Select(rig.Residency));
        var (read, _) = await rig.Get(0, 2);
        Assert.Equal(2, read);
        await rig.Manager.WhenPromotionsIdleAsync();
        Assert.Equal([Gpu | Host, Gpu | Host], new[] { 0, 1 }.Select(rig.Residency));
        var stats = rig.Manager.Stats();
        Assert.Equal(2, stats.Tiers[0].PromotionsIn);
        Assert.Equal(2, stats.Tiers[1].Hits);
        // Evicting a promoted copy costs no write: the host copy is still there (10 and 11 went down while promoting).
        int hostWrites = rig.Stores[1].Writes;
        await rig.Put(20, 2);
        Assert.Equal(hostWrites, rig.Stores[1].Writes);
        Assert.All(rig.Manager.Stats().Tiers, t => Assert.True(t.UsedBytes <= t.CapacityBytes));
    }

    // A store that throws OperationCanceledException during a promotion (its own timeout, not the manager's shutdown)
    // counts as a failed promotion: the loop goes on, and waiting for promotions to go idle still ends.
    [Fact]
    public async Task A_promotion_cancelled_inside_a_store_does_not_stop_the_promotions_behind_it()
    {
        await using var rig = new TierRig([2, 4], promote: true);
        await rig.Put(0, 2);
        await rig.Put(10, 2); // 0 and 1 go to the host tier
        rig.Stores[0].CancelWrites = true;
        Assert.Equal(2, (await rig.Get(0, 2)).Read);
        await rig.Manager.WhenPromotionsIdleAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal(1, rig.Manager.Stats().PromotionsFailed); // block 0's; block 1 then waits for its parent to move up
        rig.Stores[0].CancelWrites = false;
        Assert.Equal(2, (await rig.Get(0, 2)).Read);
        await rig.Manager.WhenPromotionsIdleAsync().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.Equal([Gpu | Host, Gpu | Host], new[] { 0, 1 }.Select(rig.Residency));
    }

    [Fact]
    public async Task Write_through_also_places_the_block_in_the_slowest_tier()
    {
        await using var rig = new TierRig([2, 2, 4], WritePolicy.WriteThrough);
        await rig.Put(0, 2);
        Assert.Equal([Gpu | Ssd, Gpu | Ssd], new[] { 0, 1 }.Select(rig.Residency));
        await rig.Put(10, 2);
        // Evicted from the GPU with a durable copy already below: dropped from the GPU, no host write.
        Assert.Equal([Ssd, Ssd], new[] { 0, 1 }.Select(rig.Residency));
        Assert.Equal(0, rig.Stores[1].Writes);
    }

    [Fact]
    public async Task A_refused_block_bypasses_the_tier_and_is_dropped_at_the_last()
    {
        await using var rig = new TierRig([1, 2], configure: (o, i) => i == 1 ? o with { Admission = new SeenTwiceAdmissionFilter(1024) } : o);
        await rig.Put(0, 1);
        await rig.Put(1, 1); // 0 is evicted; the SSD stand-in has never seen it: refused, dropped
        Assert.Equal(0, rig.Residency(0));
        Assert.Equal(1, rig.Manager.Stats().Tiers[1].AdmissionRefusals);
        await rig.Put(0, 1); // 1 is evicted and dropped the same way
        await rig.Put(1, 1); // 0 again: seen before, admitted this time
        Assert.Equal(Host, rig.Residency(0));
    }

    [Fact]
    public async Task A_policy_that_refuses_admission_to_a_full_tier_sends_the_block_down()
    {
        await using var rig = new TierRig([1, 2], configure: (o, i) => i == 0 ? o with { Policy = new TestLruPolicy { AdmitWhenFull = _ => false } } : o);
        await rig.Put(0, 1);
        await rig.Put(1, 1);
        Assert.Equal(Gpu, rig.Residency(0));
        Assert.Equal(Host, rig.Residency(1));
    }

    [Fact]
    public async Task The_gate_serves_a_miss_when_loading_would_be_slower_than_recomputing()
    {
        // 64-byte blocks; the second tier reads at 64 B/s (1 s per block); recomputing the block at depth d takes
        // 0.25 + 0.25 d seconds.
        await using var rig = new TierRig([1, 8],
            configure: (o, i) => i == 1 ? o with { ReadBandwidthBytesPerSecond = 64, ReadLatencySeconds = 0 } : o,
            configureManager: m => m with { RecomputeSecondsPerBlock = 0.25, RecomputeSecondsPerBlockPerDepth = 0.25 });
        await rig.Put(0, 4);
        Assert.Equal([Gpu, Host, Host, Host], Enumerable.Range(0, 4).Select(rig.Residency));
        // load(k) ~ 0, 1, 2, 3 s against recompute(k) = 0.25, 0.75, 1.5, 2.5 s: only the first block is worth loading.
        Assert.Equal(new LookupResult(4, 1), rig.Manager.Lookup(0, Hashes(0, 4)));

        // Reads measure the tier: each read now takes 0.1 s, so its bandwidth estimate rises towards 640 B/s.
        rig.Stores[1].OnRead = _ => rig.Time.Advance(TimeSpan.FromSeconds(0.1));
        for (int i = 0; i < 30; i++)
            Assert.Equal(2, (await rig.Get(0, 2)).Read);
        double measured = rig.Manager.Stats().Tiers[1].ReadBandwidthBytesPerSecond;
        Assert.InRange(measured, 600, 641);
        Assert.Equal(new LookupResult(4, 4), rig.Manager.Lookup(0, Hashes(0, 4)));
    }

    [Fact]
    public async Task Delete_removes_a_block_and_its_descendants_but_keeps_pinned_ones_with_their_ancestors()
    {
        await using var rig = new TierRig([8]);
        await rig.Put(0, 4);
        await rig.Put(10, 2, parent: 1); // a branch off block 1
        rig.Manager.Pin(0, [Hash(10), Hash(11)], TimeSpan.FromHours(1));
        var result = await rig.Manager.DeleteAsync(0, Hash(1));
        Assert.Equal(new DeleteResult(2, 3), result); // 2 and 3 deleted; 11, 10 (pinned) and 1 (their parent) kept
        Assert.Equal([Gpu, Gpu, 0, 0, Gpu, Gpu], new[] { 0, 1, 2, 3, 10, 11 }.Select(rig.Residency));
        Assert.Equal(4 * TierRig.BlockBytes, rig.Manager.Stats().Tiers[0].UsedBytes);
        Assert.Equal(4, rig.Stores[0].Count);
        Assert.Equal(2, rig.Sink.Events.Count(e => e.Kind == KvEventKind.Removed));
    }

    [Fact]
    public async Task A_put_under_a_parent_that_is_not_cached_stores_nothing()
    {
        await using var rig = new TierRig([4]);
        var r = await rig.Put(5, 2, parent: 4);
        Assert.Equal(PutStatus.ParentMissing, r.Status);
        Assert.Contains("not cached", r.Detail, StringComparison.Ordinal);
        Assert.Equal(0, rig.Manager.Stats().Blocks);
    }

    [Fact]
    public async Task A_failing_store_loses_only_that_placement_and_accounting_stays_exact()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 1);
        rig.Stores[1].FailWrites = true;
        var r = await rig.Put(1, 1);
        // The GPU victim cannot be written to the failing tier below; it has no children, so it is dropped (a cache
        // may always drop a leaf) and the new block takes its place.
        Assert.Equal(PutStatus.Stored, r.Status);
        Assert.Equal([0, Gpu], new[] { 0, 1 }.Select(rig.Residency));
        var stats = rig.Manager.Stats();
        Assert.Equal(TierRig.BlockBytes, stats.Tiers[0].UsedBytes);
        Assert.Equal(0, stats.Tiers[1].UsedBytes);
        Assert.Equal(0, stats.Tiers[1].ReservedBytes);
        Assert.Equal(1, stats.Tiers[1].StoreErrors);
        // A put that finds only the failing tier is told so and changes nothing.
        var r2 = await rig.Put(2, 1, parent: 1);
        Assert.Equal(PutStatus.StoreFailed, r2.Status);
        Assert.Contains("failed to write", r2.Detail, StringComparison.Ordinal);
        Assert.Equal(TierRig.BlockBytes, rig.Manager.Stats().Tiers[0].UsedBytes);
        rig.Stores[1].FailWrites = false;
        Assert.Equal(PutStatus.Stored, (await rig.Put(2, 1, parent: 1)).Status);
        Assert.Equal([Gpu, Host], new[] { 1, 2 }.Select(rig.Residency));
    }

    [Fact]
    public async Task A_corrupt_block_is_dropped_with_its_unreachable_descendants_and_the_read_stops_there()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 3); // 0 in the first tier, 1 and 2 in the second
        rig.Stores[1].CorruptOnRead.Add(new BlockKey(0, Hash(1)));
        var (read, _) = await rig.Get(0, 3);
        Assert.Equal(1, read);
        Assert.Equal([Gpu, 0, 0], new[] { 0, 1, 2 }.Select(rig.Residency));
        var stats = rig.Manager.Stats();
        Assert.Equal(TierRig.BlockBytes, stats.Tiers[0].UsedBytes);
        Assert.Equal(0, stats.Tiers[1].UsedBytes);
        Assert.Equal(0, rig.Stores[1].Count);
        Assert.Equal(1, stats.Blocks);
    }

    [Fact]
    public async Task Clear_drops_everything_with_one_cleared_event_per_tier()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 3);
        Assert.Equal(new ClearResult(3, 0), await rig.Manager.ClearAsync());
        Assert.Equal(0, rig.Manager.Stats().Blocks);
        Assert.All(rig.Stores, s => Assert.Equal(0, s.Count));
        Assert.Equal([KvEventKind.Cleared, KvEventKind.Cleared], rig.Sink.Events.TakeLast(2).Select(e => e.Kind));
        var seq = rig.Sink.Events.Select(e => e.Sequence).ToArray();
        Assert.Equal(Enumerable.Range(1, seq.Length).Select(i => (ulong)i), seq);
    }

    // A Clear must not pull bytes out from under a transfer: pinned and in-use blocks stay (with their ancestors), and
    // the events name exactly the copies that went, so an index fed by them matches what the tiers hold.
    [Fact]
    public async Task Clear_keeps_pinned_and_in_use_blocks_and_its_events_say_exactly_what_went()
    {
        await using var rig = new TierRig([2, 8]);
        await rig.Put(0, 3);            // 0 <- 1 <- 2
        await rig.Put(10, 2);           // 10 <- 11
        await rig.Put(20, 2);           // 20 <- 21: nothing holds it
        Assert.Equal(2, rig.Manager.Pin(0, Hashes(0, 2), TimeSpan.FromHours(1)));
        rig.Time.Advance(TimeSpan.FromMinutes(1));
        using (var use = rig.Manager.Acquire(0, Hashes(10, 1)))
        {
            Assert.Equal(1, use.Count);
            int before = rig.Sink.Events.Count;
            Assert.Equal(new ClearResult(Cleared: 4, KeptBusy: 3), await rig.Manager.ClearAsync());

            foreach (int kept in new[] { 0, 1, 10 })
                Assert.NotEqual(0, rig.Residency(kept));
            foreach (int gone in new[] { 2, 11, 20, 21 })
                Assert.Equal(0, rig.Residency(gone));
            Assert.Equal(3, rig.Manager.Stats().Blocks);
            foreach (int gone in new[] { 2, 11, 20, 21 })
                Assert.All(rig.Stores, store => Assert.False(store.Contains(new BlockKey(0, Hash(gone))), $"block {gone} still in {store.Kind}"));
            var (read, buffers) = await rig.Get(0, 2);
            Assert.Equal(2, read);
            Assert.Equal(Bytes(0, TierRig.BlockBytes), buffers[0]);
            Assert.Equal(Bytes(1, TierRig.BlockBytes), buffers[1]);

            var after = rig.Sink.Events.Skip(before).ToList();
            Assert.DoesNotContain(after, e => e.Kind == KvEventKind.Cleared); // Cleared would say the kept blocks went too
            Assert.All(after, e => Assert.Equal(KvEventKind.Removed, e.Kind));
            Assert.Equal(new[] { 2, 11, 20, 21 }.Select(n => Hash(n).ToString()).Order(), after.Select(e => e.Block.ToString()).Distinct().Order());
        }

        // Every event replayed over an empty index gives what the tiers hold (a snapshot lists it).
        var model = new HashSet<(TierKind Tier, BlockHash Block)>();
        foreach (var e in rig.Sink.Events)
        {
            if (e.Kind == KvEventKind.Stored)
                Assert.True(model.Add((e.Tier, e.Block)), $"stored twice: {e.Block} in {e.Tier}");
            else if (e.Kind == KvEventKind.Removed)
                Assert.True(model.Remove((e.Tier, e.Block)), $"removed but not held: {e.Block} in {e.Tier}");
            else
                model.RemoveWhere(x => x.Tier == e.Tier);
        }
        Assert.Equal(rig.Manager.SnapshotEvents().Select(e => $"{e.Tier} {e.Block}").Order(), model.Select(x => $"{x.Tier} {x.Block}").Order());
        var seq = rig.Sink.Events.Select(e => e.Sequence).ToArray();
        Assert.Equal(Enumerable.Range(1, seq.Length).Select(i => (ulong)i), seq);

        // Once nothing holds them, the next Clear takes them and says so with one Cleared per tier.
        Assert.Equal(2, rig.Manager.Unpin(0, Hashes(0, 2)));
        Assert.Equal(new ClearResult(3, 0), await rig.Manager.ClearAsync());
        Assert.Equal(0, rig.Manager.Stats().Blocks);
        Assert.Equal([KvEventKind.Cleared, KvEventKind.Cleared], rig.Sink.Events.TakeLast(2).Select(e => e.Kind));
    }

    [Fact]
    public async Task Bad_configuration_and_input_get_errors_that_say_what_to_do()
    {
        var store = new InMemoryTestStore(TierKind.Gpu, 0);
        Assert.Contains("positive capacity", Assert.Throws<ArgumentOutOfRangeException>(() =>
            new TierManager(new TierManagerOptions { Tiers = [new TierOptions { Store = store, Policy = new TestLruPolicy() }] })).Message);
        Assert.Contains("fastest first", Assert.Throws<ArgumentException>(() => new TierManager(new TierManagerOptions
        {
            Tiers =
            [
                new TierOptions { Store = new InMemoryTestStore(TierKind.Host, 64), Policy = new TestLruPolicy() },
                new TierOptions { Store = new InMemoryTestStore(TierKind.Gpu, 64), Policy = new TestLruPolicy() },
            ],
        })).Message);

        await using var rig = new TierRig([2]);
        Assert.Contains("no Gpu tier", Assert.Throws<ArgumentException>(() => rig.Manager.GetStore(TierKind.Gpu)).Message);
        Assert.Contains("more than the whole", (await Assert.ThrowsAsync<ArgumentException>(async () =>
            await rig.Manager.PutAsync(0, null, [new BlockPut(Hash(1), new byte[1000])]))).Message);
        Assert.Contains("pass one per block", (await Assert.ThrowsAsync<ArgumentException>(async () =>
            await rig.Manager.GetAsync(0, Hashes(0, 2), [new byte[64]]))).Message);
    }

    [Fact]
    public async Task Events_go_through_a_bounded_channel_that_counts_what_a_slow_consumer_missed()
    {
        var channel = new KvEventChannel(capacity: 2);
        await using var rig = new TierRig([8], configureManager: m => m with { Events = channel });
        await rig.Put(0, 3);
        Assert.Equal(1, channel.Dropped);
        Assert.True(channel.Reader.TryRead(out var first));
        Assert.Equal(1UL, first.Sequence);
        var snapshot = rig.Manager.SnapshotEvents();
        Assert.Equal(3, snapshot.Count);
        Assert.All(snapshot, e => Assert.Equal(3UL, e.Sequence));
        Assert.Equal(Hash(0), snapshot[0].Block);
    }

    [Fact]
    public async Task A_durable_last_tier_is_recovered_parents_first_and_orphans_are_removed()
    {
        const int size = TierRig.BlockBytes;
        var ssd = new RecoveredTestStore(TierKind.Ssd, 16 * size);
        // Chain 0-1-2 survived; 7's parent 6 did not.
        ssd.Seed(new BlockKey(0, Hash(2)), new BlockMeta(Hash(1), 2, size), Bytes(2, size));
        ssd.Seed(new BlockKey(0, Hash(0)), new BlockMeta(default, 0, size), Bytes(0, size));
        ssd.Seed(new BlockKey(0, Hash(1)), new BlockMeta(Hash(0), 1, size), Bytes(1, size));
        ssd.Seed(new BlockKey(0, Hash(7)), new BlockMeta(Hash(6), 1, size), Bytes(7, size));
        var sink = new RecordingSink();
        await using var manager = new TierManager(new TierManagerOptions
        {
            Tiers =
            [
                new TierOptions { Store = new InMemoryTestStore(TierKind.Host, 4 * size), Policy = new TestLruPolicy() },
                new TierOptions { Store = ssd, Policy = new TestLruPolicy() },
            ],
            Events = sink,
        });
        var tiers = new TierKind[3];
        Assert.Equal(new LookupResult(3, 3), manager.Lookup(0, Hashes(0, 3), tiers));
        Assert.All(tiers, t => Assert.Equal(TierKind.Ssd, t));
        Assert.False(ssd.Contains(new BlockKey(0, Hash(7))));
        Assert.Equal(3 * size, manager.Stats().Tiers[1].UsedBytes);
        Assert.Equal([Hash(0), Hash(1), Hash(2)], sink.Events.Select(e => e.Block));
        var buffer = new byte[size];
        Assert.Equal(1, await manager.GetAsync(0, Hashes(2, 1), [buffer]));
        Assert.Equal(Bytes(2, size), buffer);
    }

    [Fact]
    public async Task Stats_count_bytes_moved_between_tiers_apart_from_puts()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 1);
        await rig.Put(1, 1); // 0 demoted
        var stats = rig.Manager.Stats();
        Assert.Equal(2 * TierRig.BlockBytes, stats.Tiers[0].BytesIn);
        Assert.Equal(TierRig.BlockBytes, stats.Tiers[0].BytesOut);
        Assert.Equal(TierRig.BlockBytes, stats.Tiers[1].BytesMovedIn);
        Assert.Equal(1, stats.Tiers[1].DemotionsIn);
        Assert.Equal(1, stats.Tiers[0].Evictions);
    }

    [Fact]
    public async Task Lookup_and_touching_puts_allocate_nothing_per_call()
    {
        await using var rig = new TierRig([64, 64]);
        await rig.Put(0, 64);
        var chain = Hashes(0, 64);
        var tiers = new TierKind[64];
        var touch = Chain(0, 64, TierRig.BlockBytes);
        rig.Manager.Lookup(0, chain, tiers);
        await rig.Manager.PutAsync(0, null, touch);

        // Assertions stay outside the measured loops: xunit's Assert.Equal allocates.
        int matched = 0, present = 0;
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 100; i++)
            matched += rig.Manager.Lookup(0, chain, tiers).Matched;
        long lookupBytes = GC.GetAllocatedBytesForCurrentThread() - before;

        before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 100; i++)
            present += (await rig.Manager.PutAsync(0, null, touch)).AlreadyPresent;
        long putBytes = GC.GetAllocatedBytesForCurrentThread() - before;

        Assert.Equal((6400, 6400), (matched, present));
        Assert.Equal((0L, 0L), (lookupBytes, putBytes));
    }

    [Fact]
    public async Task A_victim_found_corrupt_while_being_demoted_is_dropped_and_the_put_goes_on()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 1);
        rig.Stores[0].CorruptOnRead.Add(new BlockKey(0, Hash(0)));
        Assert.Equal(PutStatus.Stored, (await rig.Put(1, 1)).Status);
        Assert.Equal([0, Gpu], new[] { 0, 1 }.Select(rig.Residency));
        var stats = rig.Manager.Stats();
        Assert.Equal(TierRig.BlockBytes, stats.Tiers[0].UsedBytes);
        Assert.Equal((0L, 0L), (stats.Tiers[1].UsedBytes, stats.Tiers[1].ReservedBytes));
        Assert.Equal([KvEventKind.Stored, KvEventKind.Removed, KvEventKind.Stored], rig.Sink.Events.Select(e => e.Kind));
    }

    [Fact]
    public async Task A_cancelled_put_changes_nothing()
    {
        await using var rig = new TierRig([4]);
        using var cancelled = new CancellationTokenSource();
        await cancelled.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
            await rig.Manager.PutAsync(0, null, Chain(0, 2, TierRig.BlockBytes), cancelled.Token));
        Assert.Equal(0, rig.Manager.Stats().Blocks);
        Assert.Empty(rig.Sink.Events);
        Assert.Equal(PutStatus.Stored, (await rig.Put(0, 2)).Status); // the mover gate was released
    }
}
