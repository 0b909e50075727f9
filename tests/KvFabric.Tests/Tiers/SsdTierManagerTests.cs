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

    // Compaction reads every live record of the segment it frees and drops one that fails its checksum (it goes away with
    // the segment). The manager is not told: a later read finds the block absent, and the manager must repair its
    // metadata then, as after a BlockCorruptException, instead of reporting the block (and the chain below it) cached.
    [Fact]
    public async Task A_block_compaction_dropped_as_corrupt_leaves_the_managers_metadata_at_the_next_read()
    {
        using var dir = new TempDir();
        const int Blocks = 70, Record = 4096 + Ssd.BlockBytes; // 60 records fill the first 4 MiB data segment
        var ssd = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, capacity: 16L << 20, compression: false) with { CompactionSlack = 100 });
        await using var manager = new TierManager(new TierManagerOptions
        {
            Tiers = [new TierOptions { Store = ssd, Policy = new LruPolicy() }],
            PromoteOnHit = false,
        });
        var chain = Enumerable.Range(0, Blocks).Select(Hash).ToArray();
        var put = await manager.PutAsync(0, null, chain.Select((h, i) => new BlockPut(h, Bytes(i, Ssd.BlockBytes))).ToArray());
        Assert.Equal(Blocks, put.Stored);
        using (var f = new FileStream(Path.Combine(dir.Path, "blocks.data.0"), FileMode.Open, FileAccess.ReadWrite))
        {
            f.Position = 5L * Record + 4096 + 100; // a byte of block 5's payload
            int b = f.ReadByte();
            f.Position--;
            f.WriteByte((byte)(b ^ 0x5A));
        }
        await ssd.CompactOldestSegmentAsync();
        Assert.False(ssd.Contains(new BlockKey(0, Hash(5))));
        Assert.Equal(Blocks, manager.Lookup(0, chain).Matched); // the manager does not know yet

        var destinations = Enumerable.Range(0, Blocks).Select(_ => (Memory<byte>)new byte[Ssd.BlockBytes]).ToArray();
        Assert.Equal(5, await manager.GetAsync(0, chain, destinations));
        Assert.Equal(5, manager.Lookup(0, chain).Matched); // block 5 and the blocks below it are no longer reported cached
        put = await manager.PutAsync(0, Hash(4), chain[5..].Select((h, i) => new BlockPut(h, Bytes(5 + i, Ssd.BlockBytes))).ToArray());
        Assert.Equal(PutStatus.Stored, put.Status);
        Assert.Equal(Blocks, await manager.GetAsync(0, chain, destinations));
        Assert.Equal(Bytes(5, Ssd.BlockBytes), destinations[5].ToArray());
    }
}
