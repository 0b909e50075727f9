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

    [Theory]
    [MemberData(nameof(Seeds))]
    public void Index_RandomOperations_AgreeWithReferenceModel(int seed)
    {
        var rng = new Random(seed);
        using var tree = new RadixTree(initialBlocks: 16); // small, so the run crosses several rehashes
        var model = new ReferenceIndex();
        int workers = 2 + rng.Next(12); // past six, locations spill from the entry into the pool
        var output = new List<MatchResult>();
        for (int op = 0; op < 300; op++)
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
                    _ => TestHashes.Child(null, 1_000_000 + rng.Next(1000)), // usually unknown
                };
                var tokens = new int[1 + rng.Next(6)];
                for (int i = 0; i < tokens.Length; i++)
                    tokens[i] = rng.Next(3); // a small alphabet: chains share prefixes and branch
                var hashes = TestHashes.Chain(parent, tokens);
                var expected = model.Stored(worker, parent, hashes, tier);
                Assert.Equal(expected, tree.ApplyStored(worker, parent, hashes, tier));
            }
            else if (kind < 85 && known.Count > 0)
            {
                var hashes = Enumerable.Range(0, 1 + rng.Next(4)).Select(_ => known[rng.Next(known.Count)]).Distinct().ToArray();
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
            if (op % 5 == 0)
                CompareMatches(rng, tree, model, output);
            if (op % 25 == 0)
                CompareDumps(tree, model, rng.Next(workers));
        }
        CompareDumps(tree, model, 0);
    }

    private static void CompareMatches(Random rng, RadixTree tree, ReferenceIndex model, List<MatchResult> output)
    {
        for (int q = 0; q < 8; q++)
        {
            var tokens = new int[1 + rng.Next(10)];
            for (int i = 0; i < tokens.Length; i++)
                tokens[i] = rng.Next(3);
            var chain = TestHashes.Chain(null, tokens);
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
