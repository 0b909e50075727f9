using KvFabric.Blocks;
using KvFabric.Tiers;
using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

// A store whose writes can be held at a gate (a device that stops answering mid-copy).
internal sealed class GatedTestStore(TierKind kind, long capacityBytes) : IBlockStore
{
    private readonly InMemoryTestStore _inner = new(kind, capacityBytes);
    private TaskCompletionSource? _gate;

    public TaskCompletionSource Entered { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    public void Arm() => _gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
    public void Open() => _gate?.TrySetResult();

    public TierKind Kind => _inner.Kind;
    public long CapacityBytes => _inner.CapacityBytes;
    public long UsedBytes => _inner.UsedBytes;
    public int Count => _inner.Count;
    public bool Contains(BlockKey key) => _inner.Contains(key);
    public bool Remove(BlockKey key) => _inner.Remove(key);
    public void Dispose() => _inner.Dispose();
    public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        _inner.ReadAsync(key, destination, cancellationToken);

    public async ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        if (_gate is { } g)
        {
            Entered.TrySetResult();
            await g.Task.ConfigureAwait(false);
        }
        return await _inner.WriteAsync(key, meta, block, cancellationToken).ConfigureAwait(false);
    }
}

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
        var gpu = new GatedTestStore(TierKind.Gpu, 1L * TierRig.BlockBytes);
        var rig = new TierRig([1, 4], promote: true, configure: (o, i) => i == 0 ? o with { Store = gpu } : o);
        var m = rig.Manager;
        await Put1(m, 10);
        await Put1(m, 11); // 10 demoted to host
        await Put1(m, 12); // 11 demoted to host
        Assert.Equal(0b10, rig.Residency(10));
        Assert.Equal(0b10, rig.Residency(11));
        gpu.Arm();
        Assert.Equal(1, (await rig.Get(10, 1)).Read); // queues promotion of 10; it sticks in the GPU write
        await gpu.Entered.Task.WaitAsync(TimeSpan.FromSeconds(5));
        Assert.Equal(1, (await rig.Get(11, 1)).Read); // queues promotion of 11 behind it
        Task idle = m.WhenPromotionsIdleAsync();
        Task dispose = m.DisposeAsync().AsTask();
        gpu.Open();
        await dispose.WaitAsync(TimeSpan.FromSeconds(10));
        await idle.WaitAsync(TimeSpan.FromSeconds(5));
        await m.WhenPromotionsIdleAsync().WaitAsync(TimeSpan.FromSeconds(5));
    }

    // A Get that meets a corrupt block repairs the metadata under the mover gate; a stuck move used to hang the read even
    // after its caller cancelled. The repair still happens once the move ends.
    [Fact]
    public async Task A_read_that_finds_a_corrupt_block_honors_its_cancellation_while_a_move_is_stuck()
    {
        var gpu = new GatedTestStore(TierKind.Gpu, 1L * TierRig.BlockBytes);
        await using var rig = new TierRig([1, 4], configure: (o, i) => i == 0 ? o with { Store = gpu } : o);
        var m = rig.Manager;
        await Put1(m, 10);
        await Put1(m, 11); // 10 demoted to host
        rig.Stores[1].CorruptOnRead.Add(new BlockKey(0, Hash(10)));
        gpu.Arm();
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
            gpu.Open();
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
