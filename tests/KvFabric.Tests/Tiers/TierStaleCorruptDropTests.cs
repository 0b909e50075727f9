using KvFabric.Blocks;
using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// A store whose writes of one key wait for the test (so the test can hold the mover gate while it queues work).
internal sealed class GatedWriteStore(InMemoryTestStore inner) : IBlockStore
{
    public BlockKey? HoldKey { get; set; }
    // As a write stuck in the kernel: the held write does not end when its caller cancels.
    public bool IgnoreCancellation { get; init; }
    public TaskCompletionSource Gate { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    public TaskCompletionSource Entered { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public TierKind Kind => inner.Kind;
    public long CapacityBytes => inner.CapacityBytes;
    public long UsedBytes => inner.UsedBytes;
    public int Count => inner.Count;
    public bool Contains(BlockKey key) => inner.Contains(key);

    public async ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        if (HoldKey == key)
        {
            Entered.TrySetResult();
            await Gate.Task.WaitAsync(TimeSpan.FromSeconds(30), IgnoreCancellation ? CancellationToken.None : cancellationToken);
        }
        return await inner.WriteAsync(key, meta, block, cancellationToken);
    }

    public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        inner.ReadAsync(key, destination, cancellationToken);

    public bool Remove(BlockKey key) => inner.Remove(key);
    public void Dispose() => inner.Dispose();
}

public sealed class TierStaleCorruptDropTests
{
    // A read finds a block corrupt and waits for the mover gate to drop it. Meanwhile the block is deleted and put again
    // (fresh, good bytes, and the freed table entry reused). The late drop must not remove the fresh copy from the
    // metadata while its bytes stay in the store (an uncounted store slot, events saying it is gone).
    [Fact]
    public async Task A_late_corruption_drop_does_not_remove_a_fresh_copy_put_meanwhile()
    {
        GatedWriteStore? gated = null;
        await using var rig = new TierRig([4], configure: (o, _) => o with { Store = gated = new GatedWriteStore((InMemoryTestStore)o.Store) });
        await rig.Put(0, 1);

        gated!.HoldKey = new BlockKey(0, Hash(5));
        var holding = rig.Put(5, 1).AsTask(); // holds the mover gate inside its store write
        await gated.Entered.Task.WaitAsync(TimeSpan.FromSeconds(30));
        var delete = rig.Manager.DeleteAsync(0, Hash(0)).AsTask();
        var reput = rig.Put(0, 1).AsTask();
        rig.Stores[0].CorruptOnRead.Add(new BlockKey(0, Hash(0)));
        var read = rig.Get(0, 1); // finds the old copy corrupt, then queues behind the delete and the put for the gate
        Assert.False(read.IsCompleted);
        gated.Gate.SetResult();
        await holding;
        Assert.Equal(1, (await delete).Deleted);
        Assert.Equal(PutStatus.Stored, (await reput).Status);
        await read;

        Assert.Equal(1, rig.Residency(0)); // the fresh copy stays
        var stats = rig.Manager.Stats();
        Assert.Equal(rig.Stores[0].Count, stats.Tiers[0].Blocks);
        Assert.Equal(rig.Stores[0].UsedBytes, stats.Tiers[0].UsedBytes);
        Assert.Equal(Bytes(0, TierRig.BlockBytes), (await rig.Get(0, 1)).Buffers[0]);
    }

    // Disposal waits for a running move only so long: a store write that never returns (a device that stopped
    // answering) must not hang shutdown. The store stays open under the stuck write.
    [Fact]
    public async Task Disposal_does_not_wait_forever_for_a_stuck_move()
    {
        GatedWriteStore? gated = null;
        var rig = new TierRig([4], configure: (o, _) => o with { Store = gated = new GatedWriteStore((InMemoryTestStore)o.Store) },
            configureManager: m => m with { DisposeMoveTimeout = TimeSpan.FromMilliseconds(200) });
        gated!.HoldKey = new BlockKey(0, Hash(5));
        var stuck = rig.Put(5, 1).AsTask(); // holds the mover gate inside its store write
        await gated.Entered.Task.WaitAsync(TimeSpan.FromSeconds(30));
        await rig.DisposeAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30));
        gated.Gate.SetResult();
        await stuck.WaitAsync(TimeSpan.FromSeconds(30));
    }

    // The same for a promotion: the background promoter copying a block up into a store whose write never returns (and
    // ignores the shutdown's cancellation, as a write stuck in the kernel does) must not hang disposal either.
    [Fact]
    public async Task Disposal_does_not_wait_forever_for_a_stuck_promotion()
    {
        GatedWriteStore? gated = null;
        var rig = new TierRig([2, 4], promote: true,
            configure: (o, i) => i == 0 ? o with { Store = gated = new GatedWriteStore((InMemoryTestStore)o.Store) { IgnoreCancellation = true } } : o,
            configureManager: m => m with { DisposeMoveTimeout = TimeSpan.FromMilliseconds(200) });
        await rig.Put(0, 2);
        await rig.Put(10, 2); // 0 and 1 go to the host tier
        gated!.HoldKey = new BlockKey(0, Hash(0));
        Assert.Equal(2, (await rig.Get(0, 2)).Read); // queues their promotion to the GPU tier
        await gated.Entered.Task.WaitAsync(TimeSpan.FromSeconds(30));
        // The held write gives up by itself after 30 s: disposal must be done well before that.
        await rig.DisposeAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(15));
        gated.Gate.SetResult();
    }
}
