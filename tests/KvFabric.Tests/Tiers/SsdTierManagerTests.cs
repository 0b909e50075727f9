using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// The tier manager over a real SSD store: what it takes over from the store's recovery.
public sealed class SsdTierManagerTests
{
    private static BlockHash Hash(int i) => new(0xABCD, (ulong)i);

    private static byte[] Bytes(int i, int length)
    {
        var b = new byte[length];
        SsdWriterTool.Fill(i, b);
        return b;
    }

    // The sidecar reopens its SSD directory after a layout change (tokens per block, dtype): the blocks found there have
    // the old size. The store is configured for exactly the new size (BlockBytes), so the manager must not take them over:
    // a hit would fill only part of a new-size destination (or fail the read with a too-small destination).
    [Fact]
    public async Task Blocks_of_another_block_size_are_not_taken_over_after_a_layout_change()
    {
        using var dir = new TempDir();
        const int Old = 32 << 10, New = 64 << 10;
        SsdBlockStoreOptions Options(int blockBytes) => Ssd.Options(dir.Path, compression: false) with { BlockBytes = blockBytes, MaxBlockBytes = New };
        await using (var old = await SsdBlockStore.OpenAsync(Options(Old)))
        {
            for (int i = 0; i < 3; i++)
                Assert.True(await old.WriteAsync(new BlockKey(0, Hash(i)), new BlockMeta(i == 0 ? default : Hash(i - 1), i, Old), Bytes(i, Old)));
        }

        var ssd = await SsdBlockStore.OpenAsync(Options(New));
        await using var manager = new TierManager(new TierManagerOptions
        {
            Tiers = [new TierOptions { Store = ssd, Policy = new LruPolicy() }],
            PromoteOnHit = false,
        });
        var chain = new[] { Hash(0), Hash(1), Hash(2) };
        Assert.Equal(0, manager.Lookup(0, chain).Matched);
        var destinations = Enumerable.Range(0, 3).Select(_ => (Memory<byte>)new byte[New]).ToArray();
        Assert.Equal(0, await manager.GetAsync(0, chain, destinations));

        // The same chain put again in the new layout is stored and read back whole.
        var put = await manager.PutAsync(0, null, chain.Select((h, i) => new BlockPut(h, Bytes(100 + i, New))).ToArray());
        Assert.Equal(PutStatus.Stored, put.Status);
        Assert.Equal(3, put.Stored);
        Assert.Equal(3, await manager.GetAsync(0, chain, destinations));
        for (int i = 0; i < 3; i++)
            Assert.Equal(Bytes(100 + i, New), destinations[i].ToArray());
    }
}
