using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// Pin takes only the metadata lock, so it can land while the mover is copying the victim it picked: the commit must
// then keep the block where it is, as it does for a block a reader took meanwhile.
public sealed class TierPinDuringMoveTests
{
    private const int Gpu = 1;

    [Fact]
    public async Task A_block_pinned_while_its_demotion_copy_runs_is_not_dropped()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 1);
        int pinned = -1;
        rig.Stores[0].OnRead = _ => pinned = rig.Manager.Pin(0, [Hash(0)], TimeSpan.FromHours(1));
        rig.Stores[1].FailWrites = true; // the copy below fails, so the leaf would be dropped
        var r = await rig.Put(1, 1);

        Assert.Equal(1, pinned);
        Assert.Equal(Gpu, rig.Residency(0)); // pinned: still there, still readable
        Assert.NotEqual(PutStatus.Stored, r.Status);
        Assert.Equal(0, rig.Residency(1));
        Assert.All(rig.Sink.Events, e => Assert.Equal(KvEventKind.Stored, e.Kind));
        var stats = rig.Manager.Stats();
        Assert.Equal(TierRig.BlockBytes, stats.Tiers[0].UsedBytes);
        Assert.Equal((0L, 0L), (stats.Tiers[1].UsedBytes, stats.Tiers[1].ReservedBytes));
    }

    [Fact]
    public async Task A_block_pinned_while_its_demotion_copy_runs_is_not_moved_out()
    {
        await using var rig = new TierRig([1, 4]);
        await rig.Put(0, 1);
        rig.Stores[0].OnRead = _ => rig.Manager.Pin(0, [Hash(0)], TimeSpan.FromHours(1));
        var r = await rig.Put(1, 1);

        Assert.True(rig.Manager.Stats().Tiers[0].Evictions == 0, "a pinned block was evicted from the GPU tier");
        Assert.Equal(Gpu, rig.Residency(0) & Gpu);
        Assert.Equal(PutStatus.Stored, r.Status); // the new block goes to the host tier instead
        Assert.Equal(2, rig.Residency(1));
        var stats = rig.Manager.Stats();
        Assert.Equal(0L, stats.Tiers[0].ReservedBytes);
        Assert.Equal((long)rig.Stores[1].Count * TierRig.BlockBytes, stats.Tiers[1].UsedBytes);
    }
}
