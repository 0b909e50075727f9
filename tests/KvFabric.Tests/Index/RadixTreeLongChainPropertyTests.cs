using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;
using Xunit;

namespace KvFabric.Tests.Index;

// The property test with long chains (past Match's 16-block pipeline stage) and hashes that collide on Hi and
// the low 32 bits of Lo (only the upper 32 bits of Lo tell many of them apart).
public class RadixTreeLongChainPropertyTests
{
    private static BlockHash Squash(BlockHash h, int mode) => mode switch
    {
        0 => h,
        // 4 distinct Hi values, 2 distinct tags: long probe runs full of 12-byte twins.
        1 => new BlockHash(h.Hi & 3, (h.Lo & 0xFFFF_FFFF_0000_0000UL) | (h.Lo & 1)),
        // 1 Hi value, 1 tag.
        _ => new BlockHash(7, (h.Lo & 0xFFFF_FFFF_0000_0000UL) | 5),
    };

    private static BlockHash[] Chain(BlockHash? parent, int[] tokens, int mode)
    {
        var chain = new BlockHash[tokens.Length];
        for (int i = 0; i < tokens.Length; i++)
            parent = chain[i] = Squash(TestHashes.Child(parent, tokens[i]), mode);
        return chain;
    }

    public static TheoryData<int, int> Cases()
    {
        var data = new TheoryData<int, int>();
        for (int seed = 1; seed <= 2; seed++)
            for (int mode = 0; mode < 3; mode++)
                data.Add(seed, mode);
        return data;
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Index_LongCollidingChains_AgreeWithReferenceModel(int seed, int mode)
    {
        var rng = new Random(seed);
        using var tree = new RadixTree(initialBlocks: 16);
        var model = new ReferenceIndex();
        int workers = 2 + rng.Next(10);
        var output = new List<MatchResult>();
        for (int op = 0; op < 250; op++)
        {
            int worker = rng.Next(workers);
            var tier = (TierKind)rng.Next(3);
            var known = model.KnownBlocks.ToList();
            int kind = rng.Next(100);
            if (kind < 55)
            {
                BlockHash? parent = rng.Next(10) switch
                {
                    < 3 => null,
                    < 9 when known.Count > 0 => known[rng.Next(known.Count)],
                    _ => Squash(TestHashes.Child(null, 1_000_000 + rng.Next(1000)), mode),
                };
                var tokens = new int[1 + rng.Next(40)];
                for (int i = 0; i < tokens.Length; i++)
                    tokens[i] = rng.Next(3);
                var hashes = Chain(parent, tokens, mode);
                if (hashes.Distinct().Count() != hashes.Length || (parent is { } pp && hashes.Contains(pp)))
                    continue;
                var expected = model.Stored(worker, parent, hashes, tier);
                Assert.Equal(expected, tree.ApplyStored(worker, parent, hashes, tier));
            }
            else if (kind < 85 && known.Count > 0)
            {
                var hashes = Enumerable.Range(0, 1 + rng.Next(30)).Select(_ => known[rng.Next(known.Count)]).Distinct().ToArray();
                model.Removed(worker, hashes, tier);
                tree.ApplyRemoved(worker, hashes, tier);
            }
            else if (kind < 95)
            {
                TierKind? which = rng.Next(2) == 0 ? null : tier;
                model.ClearWorker(worker, which);
                tree.ClearWorker(worker, which);
            }

            Assert.Equal(model.Existing().Count, tree.Blocks);
            Assert.Equal(model.Locations, tree.Locations);
            foreach (var h in model.KnownBlocks)
                Assert.Equal(model.Existing().Contains(h), tree.Contains(h));
            for (int q = 0; q < 6; q++)
            {
                var tokens = new int[1 + rng.Next(60)];
                for (int i = 0; i < tokens.Length; i++)
                    tokens[i] = rng.Next(3);
                var chain = Chain(null, tokens, mode);
                var expected = model.Match(chain);
                int longest = tree.Match(chain, output);
                Assert.Equal(expected, output);
                Assert.Equal(expected.Count == 0 ? 0 : expected[0].Matched, longest);
            }
            if (op % 25 == 0)
            {
                var runs = new List<StoredRun>();
                tree.Dump(runs);
                Assert.Equal(model.DumpSet(), ReferenceIndex.Flatten(runs));
            }
        }
    }
}

public class RadixTreeZeroHashTests
{
    [Fact]
    public void Index_Match_ZeroHashInChain_StopsThere()
    {
        using var tree = new RadixTree(initialBlocks: 16);
        var a = TestHashes.Chain(3, salt: 9);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(0, null, a, TierKind.Gpu));
        var output = new List<MatchResult>();
        // a[^1] is the last entry handed out: the entry after it is unused (all zero), as a free one is.
        Assert.Equal(3, tree.Match([.. a, default, default], output));
        Assert.Equal([new MatchResult(0, 3, 3, 0, 0)], output);
        Assert.Equal(0, tree.Match([default, .. a], output));
        Assert.Empty(output);
        // Free an entry in the middle of the arena and walk into it with a zero hash.
        var b = TestHashes.Chain(1, salt: 10);
        var c = TestHashes.Chain(1, salt: 11);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(1, a[0], b, TierKind.Host));
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(1, null, c, TierKind.Host));
        Assert.Equal(1, tree.ApplyRemoved(1, b, TierKind.Host));
        Assert.Equal(3, tree.Match([a[0], a[1], a[2], default], output));
        Assert.Equal(1, tree.Match([a[0], default, a[1]], output));
    }
}
