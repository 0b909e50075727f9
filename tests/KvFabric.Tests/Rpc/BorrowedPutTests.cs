using KvFabric.Blocks;
using KvFabric.Service;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Stores;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>IPutBatch.AddBorrowed: a block stored from the caller's memory (what a fetch does with its staging slots).</summary>
public sealed class BorrowedPutTests
{
    private static TieredFabricStore NewStore(KvLayout layout, int maxStaged) =>
        new(layout, "n", maxStaged, sink => new TierManager(new TierManagerOptions
        {
            Tiers = [new TierOptions { Store = new HostBlockStore((int)layout.BlockBytes, 8), Policy = new LruPolicy(8) }],
            Events = sink,
        }));

    [Fact]
    public async Task Borrowed_blocks_are_stored_byte_exact_and_do_not_use_staging_buffers()
    {
        var layout = SidecarFixture.SmallLayout;
        int blockBytes = (int)layout.BlockBytes;
        using var store = NewStore(layout, maxStaged: 1);
        var chain = TestBlocks.Chain("borrowed", 3).Select(h => BlockHash.FromBytes(h)).ToArray();
        byte[] source = new byte[3 * blockBytes];
        new Random(5).NextBytes(source);
        using (IPutBatch batch = store.BeginPut(1))
        {
            // Three borrowed blocks with a staging limit of one: borrowed bytes hold no staging buffer.
            for (int i = 0; i < chain.Length; i++)
                batch.AddBorrowed(chain[i], i == 0 ? null : chain[i - 1], i, source.AsMemory(i * blockBytes, blockBytes));
            // And the one staging buffer is still there for a copied block.
            var extra = BlockHash.FromBytes(TestBlocks.Chain("borrowed-extra", 1)[0]);
            new Random(6).NextBytes(batch.Add(extra, chain[^1], 3).Span);
            PutOutcome outcome = await batch.CommitAsync(CancellationToken.None);
            Assert.Equal(4, outcome.Stored);
        }

        for (int i = 0; i < chain.Length; i++)
        {
            using ReadLease? lease = await store.OpenReadAsync(1, chain[i], CancellationToken.None);
            Assert.NotNull(lease);
            ReadOnlyMemory<byte> bytes = await lease.LoadAsync(CancellationToken.None);
            Assert.True(bytes.Span.SequenceEqual(source.AsSpan(i * blockBytes, blockBytes)), $"block {i} differs from the bytes it was put from");
        }
    }

    [Fact]
    public void A_borrowed_block_of_the_wrong_size_is_refused_with_the_sizes()
    {
        var layout = SidecarFixture.SmallLayout;
        using var store = NewStore(layout, maxStaged: 4);
        using IPutBatch batch = store.BeginPut(1);
        var hash = BlockHash.FromBytes(TestBlocks.Chain("borrowed-short", 1)[0]);
        var e = Assert.Throws<ArgumentException>(() => batch.AddBorrowed(hash, null, 0, new byte[layout.BlockBytes - 1]));
        Assert.Contains($"exactly {layout.BlockBytes}", e.Message);
    }
}
