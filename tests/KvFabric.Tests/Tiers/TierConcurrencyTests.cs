using System.Numerics;
using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

public sealed class TierConcurrencyTests
{
    // Readers, writers, pins and background promotions race; whatever the interleaving, the end state must agree with
    // the event stream, stay within capacity, and every byte read must be the block's own.
    [Fact]
    public async Task Concurrent_puts_gets_pins_and_promotions_leave_exact_accounting_and_correct_bytes()
    {
        await using var rig = new TierRig([4, 8, 16], promote: true);
        const int chains = 12, depth = 4;
        int Node(int c, int i) => c * 100 + i;
        var writers = Enumerable.Range(0, 2).Select(w => Task.Run(async () =>
        {
            for (int round = 0; round < 30; round++)
            {
                int c = (round * 7 + w * 5) % chains;
                var r = await rig.Put(Node(c, 0), depth);
                Assert.NotEqual(PutStatus.StoreFailed, r.Status);
            }
        }));
        var readers = Enumerable.Range(0, 3).Select(rd => Task.Run(async () =>
        {
            for (int round = 0; round < 60; round++)
            {
                int c = (round * 3 + rd) % chains;
                var (read, buffers) = await rig.Get(Node(c, 0), depth);
                for (int i = 0; i < read; i++)
                    Assert.Equal(Bytes(Node(c, i), TierRig.BlockBytes), buffers[i]);
                if (round % 5 == 0)
                {
                    var hashes = Hashes(Node(c, 0), depth);
                    rig.Manager.Pin(0, hashes, TimeSpan.FromHours(1));
                    using (rig.Manager.Acquire(0, hashes)) { }
                    rig.Manager.Unpin(0, hashes);
                }
            }
        }));
        await Task.WhenAll(writers.Concat(readers));
        await rig.Manager.WhenPromotionsIdleAsync();

        var masks = new Dictionary<int, int>();
        ulong last = 0;
        var tiers = rig.Manager.Tiers.ToList();
        foreach (var e in rig.Sink.Events)
        {
            Assert.Equal(last + 1, e.Sequence);
            last = e.Sequence;
            int n = (int)e.Block.Lo, bit = 1 << tiers.IndexOf(e.Tier);
            masks[n] = e.Kind == KvEventKind.Stored ? masks.GetValueOrDefault(n) | bit : masks[n] & ~bit;
        }
        var stats = rig.Manager.Stats();
        for (int t = 0; t < 3; t++)
        {
            int count = masks.Values.Count(m => (m & (1 << t)) != 0);
            Assert.Equal((long)count * TierRig.BlockBytes, stats.Tiers[t].UsedBytes);
            Assert.Equal(count, rig.Stores[t].Count);
            Assert.Equal(0, stats.Tiers[t].ReservedBytes);
        }
        foreach (var (n, mask) in masks)
        {
            Assert.Equal(mask, rig.Residency(n));
            if (mask != 0 && n % 100 > 0)
            {
                int parent = rig.Residency(n - 1);
                Assert.NotEqual(0, parent);
                Assert.True(BitOperations.TrailingZeroCount(parent) <= BitOperations.TrailingZeroCount(mask));
            }
        }
    }
}
