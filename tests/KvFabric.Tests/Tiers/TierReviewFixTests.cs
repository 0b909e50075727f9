using KvFabric.Blocks;
using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

public sealed class TierReviewFixTests
{
    private static async Task Put1(TierManager m, int n, int bytes = TierRig.BlockBytes, int? parent = null) =>
        Assert.Equal(PutStatus.Stored, (await m.PutAsync(0, parent is { } p ? Hash(p) : null, [new BlockPut(Hash(n), Bytes(n, bytes))])).Status);

    // PutAsync sets storedByThisCall[i] after block i is stored: a short array used to throw IndexOutOfRangeException
    // half-way, with blocks already stored and published.
    [Fact]
    public async Task A_short_storedByThisCall_is_refused_before_anything_is_stored()
    {
        await using var rig = new TierRig([8]);
        var ex = await Record.ExceptionAsync(async () => await rig.Manager.PutAsync(0, null, Chain(0, 3, TierRig.BlockBytes), new bool[1]));
        Assert.IsAssignableFrom<ArgumentException>(ex);
        Assert.Equal(0, rig.Residency(0));
        Assert.Empty(rig.Sink.Events);
    }

    // DisposeAsync abandons queued promotions: a WhenPromotionsIdleAsync task taken before (or after) it used to never
    // complete.
    [Fact]
    public async Task Waiting_for_idle_promotions_ends_when_disposal_abandons_the_queued_ones()
    {
        var gpu = new GatedWriteStore(new InMemoryTestStore(TierKind.Gpu, 1L * TierRig.BlockBytes)) { IgnoreCancellation = true };
        var rig = new TierRig([1, 4], promote: true, configure: (o, i) => i == 0 ? o with { Store = gpu } : o);
        var m = rig.Manager;
        await Put1(m, 10);
        await Put1(m, 11); // 10 demoted to host
        await Put1(m, 12); // 11 demoted to host
        Assert.Equal(0b10, rig.Residency(10));
        Assert.Equal(0b10, rig.Residency(11));
        gpu.HoldKey = new BlockKey(0, Hash(10));
        Assert.Equal(1, (await rig.Get(10, 1)).Read); // queues promotion of 10; it sticks in the GPU write
        await gpu.Entered.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(1, (await rig.Get(11, 1)).Read); // queues promotion of 11 behind it
        Task idle = m.WhenPromotionsIdleAsync();
        Task dispose = m.DisposeAsync().AsTask();
        gpu.Gate.SetResult();
        await dispose.WaitAsync(TimeSpan.FromSeconds(10));
        await idle.WaitAsync(TimeSpan.FromSeconds(5));
        await m.WhenPromotionsIdleAsync().WaitAsync(TimeSpan.FromSeconds(5));
    }

    // A Get that meets a corrupt block repairs the metadata under the mover gate; a stuck move used to hang the read even
    // after its caller cancelled. The repair still happens once the move ends.
    [Fact]
    public async Task A_read_that_finds_a_corrupt_block_honors_its_cancellation_while_a_move_is_stuck()
    {
        var gpu = new GatedWriteStore(new InMemoryTestStore(TierKind.Gpu, 1L * TierRig.BlockBytes)) { IgnoreCancellation = true };
        await using var rig = new TierRig([1, 4], configure: (o, i) => i == 0 ? o with { Store = gpu } : o);
        var m = rig.Manager;
        await Put1(m, 10);
        await Put1(m, 11); // 10 demoted to host
        rig.Stores[1].CorruptOnRead.Add(new BlockKey(0, Hash(10)));
        gpu.HoldKey = new BlockKey(0, Hash(12));
        var put = m.PutAsync(0, null, [new BlockPut(Hash(12), Bytes(12, TierRig.BlockBytes))]).AsTask(); // holds the mover, stuck
        await gpu.Entered.Task.WaitAsync(TimeSpan.FromSeconds(5));
        using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
        var get = m.GetAsync(0, new[] { Hash(10) }, [new byte[TierRig.BlockBytes]], cts.Token).AsTask();
        try
        {
            var done = await Task.WhenAny(get, Task.Delay(TimeSpan.FromSeconds(3)));
            Assert.True(done == get, "GetAsync still waits for the mover 3 s after its token was cancelled");
        }
        finally
        {
            gpu.Gate.SetResult();
            await put;
            try { await get; } catch (OperationCanceledException) { }
        }

        // The repair went on without the reader: once the move let go of the gate, the corrupt copy left the metadata.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (rig.Residency(10) != 0 && DateTime.UtcNow < deadline)
            await Task.Delay(10);
        Assert.Equal(0, rig.Residency(10));
    }
}
