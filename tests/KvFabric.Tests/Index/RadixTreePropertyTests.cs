using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;
using Xunit;

namespace KvFabric.Tests.Index;

// Random operation sequences applied to the tree and to the brute-force model; Match, Dump and the counters must agree.
public class RadixTreePropertyTests
{
    public static TheoryData<int> Seeds()
    {
        var data = new TheoryData<int>();
        for (int seed = 1; seed <= 40; seed++)
            data.Add(seed);
        return data;
    }

    // Short chains with a small alphabet: chains share prefixes and branch, and the run crosses several rehashes.
    [Theory]
    [MemberData(nameof(Seeds))]
    public void Index_RandomOperations_AgreeWithReferenceModel(int seed) =>
        Run(seed, HashMode.Real, maxStored: 6, maxRemoved: 4, maxQuery: 10, ops: 300);

    public static TheoryData<int, HashMode> LongCases()
    {
        var data = new TheoryData<int, HashMode>();
        for (int seed = 1; seed <= 2; seed++)
        {
            foreach (var mode in Enum.GetValues<HashMode>())
                data.Add(seed, mode);
        }
        return data;
    }

    // Chains longer than Match's 16-block pipeline stage and its 32-entry ring, over an arena that grows and reuses
    // freed entries out of order; and hashes squashed so that many share the 12 bytes an index slot keeps (every
    // lookup then meets lookalikes and must tell them apart by the entry's last 4 bytes).
    [Theory]
    [MemberData(nameof(LongCases))]
    public void Index_LongAndCollidingChains_AgreeWithReferenceModel(int seed, HashMode mode) =>
        Run(seed, mode, maxStored: 40, maxRemoved: 30, maxQuery: 60, ops: 250);

    public enum HashMode
    {
        Real,
        FourHiTwoTags, // 4 distinct first-8-byte values, 2 distinct tags: long probe runs full of 12-byte twins
        OneHiOneTag,   // every hash shares its first 12 bytes (of the slot's view) with every other
    }

    private static BlockHash Squash(BlockHash h, HashMode mode) => mode switch
    {
        HashMode.FourHiTwoTags => new BlockHash(h.Hi & 3, (h.Lo & 0xFFFF_FFFF_0000_0000UL) | (h.Lo & 1)),
        HashMode.OneHiOneTag => new BlockHash(7, (h.Lo & 0xFFFF_FFFF_0000_0000UL) | 5),
        _ => h,
    };

    private static BlockHash[] Chain(BlockHash? parent, int[] tokens, HashMode mode)
    {
        var chain = new BlockHash[tokens.Length];
        for (int i = 0; i < tokens.Length; i++)
            parent = chain[i] = Squash(TestHashes.Child(parent, tokens[i]), mode);
        return chain;
    }

    private static int[] Tokens(Random rng, int max)
    {
        var tokens = new int[1 + rng.Next(max)];
        for (int i = 0; i < tokens.Length; i++)
            tokens[i] = rng.Next(3); // a small alphabet: chains share prefixes and branch
        return tokens;
    }

    private static void Run(int seed, HashMode mode, int maxStored, int maxRemoved, int maxQuery, int ops)
    {
        var rng = new Random(seed);
        using var tree = new RadixTree(initialBlocks: 16); // small, so the run crosses several rehashes and arena growths
        var model = new ReferenceIndex();
        int workers = 2 + rng.Next(12); // past six, locations spill from the entry into the pool
        var output = new List<MatchResult>();
        for (int op = 0; op < ops; op++)
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
                    _ => Squash(TestHashes.Child(null, 1_000_000 + rng.Next(1000)), mode), // usually unknown
                };
                var hashes = Chain(parent, Tokens(rng, maxStored), mode);
                if (mode != HashMode.Real && (hashes.Distinct().Count() != hashes.Length || (parent is { } pp && hashes.Contains(pp))))
                    continue; // squashing made a chain repeat a hash: not a chain any producer sends
                Assert.Equal(model.Stored(worker, parent, hashes, tier), tree.ApplyStored(worker, parent, hashes, tier));
            }
            else if (kind < 85 && known.Count > 0)
            {
                var hashes = Enumerable.Range(0, 1 + rng.Next(maxRemoved)).Select(_ => known[rng.Next(known.Count)]).Distinct().ToArray();
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
            if (mode != HashMode.Real)
            {
                var existing = model.Existing();
                foreach (var h in model.KnownBlocks)
                    Assert.Equal(existing.Contains(h), tree.Contains(h));
            }
            if (op % 5 == 0)
                CompareMatches(rng, tree, model, output, maxQuery, mode);
            if (op % 25 == 0)
                CompareDumps(tree, model, rng.Next(workers));
        }
        CompareDumps(tree, model, 0);
    }

    private static void CompareMatches(Random rng, RadixTree tree, ReferenceIndex model, List<MatchResult> output, int maxQuery, HashMode mode)
    {
        for (int q = 0; q < 8; q++)
        {
            var chain = Chain(null, Tokens(rng, maxQuery), mode);
            var expected = model.Match(chain);
            int longest = tree.Match(chain, output);
            Assert.Equal(expected, output);
            Assert.Equal(expected.Count == 0 ? 0 : expected[0].Matched, longest);
        }
    }

    private static void CompareDumps(RadixTree tree, ReferenceIndex model, int someWorker)
    {
        var runs = new List<StoredRun>();
        tree.Dump(runs);
        Assert.Equal(model.DumpSet(), ReferenceIndex.Flatten(runs));

        // Runs are chains under their parent, and replaying them in order into an empty tree rebuilds the same content.
        using var replay = new RadixTree();
        foreach (var run in runs)
        {
            Assert.Equal(ApplyStatus.Applied, replay.ApplyStored(run.Worker, run.Parent, run.Hashes, run.Tier));
        }
        var again = new List<StoredRun>();
        replay.Dump(again);
        Assert.Equal(model.DumpSet(), ReferenceIndex.Flatten(again));

        var mine = new List<StoredRun>();
        tree.Dump(mine, someWorker);
        Assert.Equal(model.DumpSet(someWorker), ReferenceIndex.Flatten(mine));
    }
}
