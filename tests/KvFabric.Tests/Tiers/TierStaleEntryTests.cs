using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// A block whose last copy failed its checksum keeps its table entry while a reader or a cached child still refers to it.
// Putting the block again must store it (the error message tells clients to) with exact accounting, not throw and leak
// the bytes it just wrote.
public sealed class TierStaleEntryTests
{
    private const int Gpu = 1, Host = 2;

    private static void AssertEventsMatchResidency(TierRig rig)
    {
        var masks = new Dictionary<ulong, int>();
        var tiers = rig.Manager.Tiers.ToList();
        foreach (var e in rig.Sink.Events)
        {
            int bit = 1 << tiers.IndexOf(e.Tier);
            masks[e.Block.Lo] = e.Kind == KvEventKind.Stored ? masks.GetValueOrDefault(e.Block.Lo) | bit : masks[e.Block.Lo] & ~bit;
        }
        foreach (var (n, mask) in masks)
            Assert.Equal(mask, rig.Residency((int)n));
        var stats = rig.Manager.Stats();
        for (int t = 0; t < tiers.Count; t++)
        {
            int count = masks.Values.Count(m => (m & (1 << t)) != 0);
            Assert.Equal((long)count * TierRig.BlockBytes, stats.Tiers[t].UsedBytes);
            Assert.Equal(count, rig.Stores[t].Count);
            Assert.Equal(0, stats.Tiers[t].ReservedBytes);
        }
    }

    [Fact]
    public async Task A_block_dropped_as_corrupt_under_a_cached_child_can_be_put_again()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 3); // 0 in the first tier, 1 and 2 in the second
        var scope = rig.Manager.Acquire(0, [Hash(2)]); // a transfer reads block 2 meanwhile
        Assert.Equal(1, scope.Count);
        rig.Stores[1].CorruptOnRead.Add(new BlockKey(0, Hash(1)));
        Assert.Equal(1, (await rig.Get(0, 3)).Read);
        scope.Dispose();
        Assert.Equal(0, rig.Residency(1));

        var r = await rig.Put(0, 3);
        Assert.Equal(PutStatus.Stored, r.Status);
        Assert.Equal(3, r.Stored + r.AlreadyPresent);
        Assert.Equal([Gpu, Host, Host], new[] { 0, 1, 2 }.Select(rig.Residency));
        Assert.Equal(3, rig.Manager.Lookup(0, Hashes(0, 3)).Matched);
        var (read, buffers) = await rig.Get(0, 3);
        Assert.Equal(3, read);
        Assert.Equal(Bytes(1, TierRig.BlockBytes), buffers[1]);
        AssertEventsMatchResidency(rig);
    }

    [Fact]
    public async Task A_block_dropped_as_corrupt_while_held_by_a_transfer_can_be_put_again_meanwhile()
    {
        await using var rig = new TierRig([4]);
        await rig.Put(0, 1);
        var scope = rig.Manager.Acquire(0, [Hash(0)]);
        rig.Stores[0].CorruptOnRead.Add(new BlockKey(0, Hash(0)));
        Assert.Equal(0, (await rig.Get(0, 1)).Read);
        Assert.Equal(0, rig.Residency(0));

        var r = await rig.Put(0, 1);
        Assert.Equal(new PutResult(PutStatus.Stored, 1, 0, 0, null), r);
        scope.Dispose();
        Assert.Equal(Gpu, rig.Residency(0));
        AssertEventsMatchResidency(rig);
        Assert.Equal(1, (await rig.Manager.DeleteAsync(0, Hash(0))).Deleted);
        Assert.Equal(0, rig.Stores[0].Count);
        AssertEventsMatchResidency(rig);
    }
}
