using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;
using Xunit;

namespace KvFabric.Tests.Index;

public class RadixTreeTests
{
    private static List<MatchResult> MatchOf(RadixTree tree, BlockHash[] chain)
    {
        var output = new List<MatchResult>();
        tree.Match(chain, output);
        return output;
    }

    [Fact]
    public void Index_Match_EmptyChainAndUnknownFirstBlock_MatchNothing()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(4);
        Assert.Empty(MatchOf(tree, chain));
        tree.ApplyStored(1, null, chain, TierKind.Gpu);
        Assert.Empty(MatchOf(tree, []));
        Assert.Empty(MatchOf(tree, TestHashes.Chain(4, salt: 9)));
        Assert.Equal([new MatchResult(1, 4, 4, 0, 0)], MatchOf(tree, chain));
    }

    [Fact]
    public void Index_Match_IsThePrefixEachWorkerHoldsWhole_SortedByLengthThenWorker()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(5);
        tree.ApplyStored(3, null, chain, TierKind.Ssd);
        tree.ApplyStored(2, null, chain[..2], TierKind.Host);
        tree.ApplyStored(7, null, chain[..2], TierKind.Gpu);
        tree.ApplyRemoved(3, chain[3..4], TierKind.Ssd); // a hole: worker 3 keeps 0..2 and 4
        tree.ApplyStored(1, null, chain, TierKind.Host);
        Assert.Equal(
            [new MatchResult(1, 5, 0, 5, 0), new MatchResult(3, 3, 0, 0, 3), new MatchResult(2, 2, 0, 2, 0), new MatchResult(7, 2, 2, 0, 0)],
            MatchOf(tree, chain));
    }

    [Fact]
    public void Index_Match_CountsEachBlockInItsFastestTier()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(3);
        tree.ApplyStored(0, null, chain, TierKind.Ssd);
        tree.ApplyStored(0, null, chain[..2], TierKind.Host);
        tree.ApplyStored(0, null, chain[..1], TierKind.Gpu);
        Assert.Equal([new MatchResult(0, 3, 1, 1, 1)], MatchOf(tree, chain));
        Assert.Equal(3, tree.Locations); // one location per block, several tier bits
    }

    [Fact]
    public void Index_RestoringWhatIsHeld_IsANoOp()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(3);
        tree.ApplyStored(0, null, chain, TierKind.Gpu);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(0, null, chain, TierKind.Gpu));
        Assert.Equal(3, tree.Blocks);
        Assert.Equal(3, tree.Locations);
        Assert.Equal(3, tree.StoredAlreadyHeld);
    }

    [Fact]
    public void Index_UnknownParentOrMismatchedParent_RejectsTheWholeEventUnchanged()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(3);
        tree.ApplyStored(0, null, chain[..2], TierKind.Gpu);
        var orphan = TestHashes.Chain(TestHashes.Child(null, 77), 1, 2);
        Assert.Equal(ApplyStatus.UnknownParent, tree.ApplyStored(1, TestHashes.Child(null, 77), orphan, TierKind.Gpu));
        // chain[1] exists under chain[0]; claiming it as a root block is a mismatch, and chain[2] must not be added either.
        Assert.Equal(ApplyStatus.ParentMismatch, tree.ApplyStored(1, null, [chain[1], chain[2]], TierKind.Gpu));
        Assert.Equal(2, tree.Blocks);
        Assert.Equal(2, tree.Locations);
        Assert.Equal(1, tree.RejectedUnknownParent);
        Assert.Equal(1, tree.RejectedParentMismatch);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(1, chain[1], chain[2..], TierKind.Host));
        Assert.Equal(3, tree.Blocks);
    }

    [Fact]
    public void Index_RemovingAMiddleBlock_StopsMatchThereAndFreesOnceTheSubtreeGoes()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(4);
        tree.ApplyStored(0, null, chain, TierKind.Gpu);
        tree.ApplyStored(1, null, chain[..1], TierKind.Gpu);
        Assert.Equal(1, tree.ApplyRemoved(0, chain[1..2], TierKind.Gpu));
        Assert.Equal(4, tree.Blocks); // chain[1] nobody holds, kept for the blocks below it
        Assert.Equal([new MatchResult(0, 1, 1, 0, 0), new MatchResult(1, 1, 1, 0, 0)], MatchOf(tree, chain));
        Assert.Equal(0, tree.ApplyRemoved(0, chain[1..2], TierKind.Gpu));
        Assert.Equal(1, tree.RemovedNotHeld);
        tree.ApplyRemoved(0, chain[2..], TierKind.Gpu);
        Assert.Equal(1, tree.Blocks); // the holderless chain[1] went with its last child; chain[0] is held by 0 and 1
        tree.ClearWorker(0, null);
        tree.ClearWorker(1, TierKind.Gpu);
        Assert.Equal(0, tree.Blocks);
        Assert.Equal(0, tree.Locations);
        Assert.Empty(MatchOf(tree, chain));
    }

    [Fact]
    public void Index_AThousandHoldersOfOneBlock_UseThePoolAndComeBackOut()
    {
        using var tree = new RadixTree();
        var prefix = TestHashes.Chain(2);
        for (int w = 0; w < 1000; w++)
            tree.ApplyStored(w, null, prefix, (TierKind)(w % 3));
        Assert.Equal(2000, tree.Locations);
        var output = MatchOf(tree, prefix);
        Assert.Equal(1000, output.Count);
        Assert.All(output, r => Assert.Equal(2, r.Matched));
        Assert.Equal(Enumerable.Range(0, 1000), output.Select(r => r.WorkerId));
        for (int w = 0; w < 1000; w += 2)
            tree.ClearWorker(w, null);
        output = MatchOf(tree, prefix);
        Assert.Equal(Enumerable.Range(0, 500).Select(i => 2 * i + 1), output.Select(r => r.WorkerId));
        for (int w = 1; w < 1000; w += 2)
            tree.ApplyRemoved(w, prefix, (TierKind)(w % 3));
        Assert.Equal(0, tree.Blocks);
        Assert.Equal(0, tree.OverflowVectors);
    }

    [Fact]
    public void Index_Growth_AcrossManyRehashes_KeepsEveryBlockAndTheAccountingExact()
    {
        using var tree = new RadixTree(initialBlocks: 1);
        long firstCapacity = tree.Capacity;
        var chains = new List<BlockHash[]>();
        for (int c = 0; c < 200; c++)
        {
            var chain = TestHashes.Chain(100, salt: c);
            chains.Add(chain);
            Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(c % 7, null, chain, TierKind.Host));
        }
        Assert.Equal(20_000, tree.Blocks);
        Assert.True(tree.Capacity >= 20_000 / 3 * 4 && tree.Capacity > firstCapacity);
        Assert.Equal(64, RadixTree.EntryBytes);
        Assert.Equal(16, RadixTree.SlotBytes);
        Assert.Equal(tree.Capacity * RadixTree.SlotBytes + tree.ArenaCapacity * RadixTree.EntryBytes + tree.OverflowPoolBytes, tree.BytesAllocated);
        // The arena doubles only when every entry is in use (its room includes ref 0, which is never handed out).
        Assert.InRange(tree.ArenaCapacity, tree.Blocks + 1, 2 * tree.Blocks + 2);
        for (int c = 0; c < 200; c++)
            Assert.Equal([new MatchResult(c % 7, 100, 0, 100, 0)], MatchOf(tree, chains[c]));
        // The table doubles only when needed: its load stays in (3/8, 3/4], which bounds the bytes per block.
        Assert.InRange(tree.Blocks, tree.Capacity * 3 / 8 + 1, tree.Capacity * 3 / 4);
        Assert.Equal(0, tree.OverflowVectors); // one holder per block: nothing outside the entries
    }

    [Fact]
    public void Index_Match_RunsOfIdenticallyHeldBlocks_CountLikeBlockByBlock()
    {
        // Ten holders (six inline, four in the vector) store one chain in the same order, so consecutive blocks have the
        // same location list; then holes, a tier change and a late extra holder break the runs in different places.
        using var tree = new RadixTree();
        var model = new ReferenceIndex();
        var chain = TestHashes.Chain(40);
        void Stored(int w, int from, int to, TierKind tier)
        {
            BlockHash? parent = from == 0 ? null : chain[from - 1];
            var part = chain[from..to];
            Assert.Equal(model.Stored(w, parent, part, tier), tree.ApplyStored(w, parent, part, tier));
        }
        for (int w = 0; w < 10; w++)
            Stored(w, 0, 40, (TierKind)(w % 3));
        var output = new List<MatchResult>();
        void Check(BlockHash[] query)
        {
            tree.Match(query, output);
            Assert.Equal(model.Match(query), output);
        }
        Check(chain);
        Check(chain[..1]);
        Check([.. chain[..25], TestHashes.Child(null, 4242)]); // a run ended by a block nobody has
        model.Removed(8, [chain[30]], TierKind.Host);
        tree.ApplyRemoved(8, [chain[30]], TierKind.Host);
        Check(chain);
        Stored(4, 10, 20, TierKind.Gpu); // worker 4 (host) adds GPU on blocks 10-19: the masks change there
        Check(chain);
        Stored(11, 0, 15, TierKind.Ssd); // a new holder for a prefix: the lists change at block 15
        Check(chain);
        model.ClearWorker(0, null);
        tree.ClearWorker(0, null);
        Check(chain);
    }

    [Fact]
    public void Index_Match_RunsOfBlocksHeldInRotatingOrder_CountLikeBlockByBlock()
    {
        // Up to six holders report each block in their own event, in an order that turns per block: consecutive blocks
        // have the same set of locations in different orders (a run as far as Match is concerned). Then a hole, a tier
        // change, a holder with another tier, and a seventh holder (a vector) change the sets in different places.
        using var tree = new RadixTree();
        var model = new ReferenceIndex();
        var chain = TestHashes.Chain(48);
        void Stored(int w, int i, TierKind tier)
        {
            BlockHash? parent = i == 0 ? null : chain[i - 1];
            Assert.Equal(model.Stored(w, parent, chain[i..(i + 1)], tier), tree.ApplyStored(w, parent, chain[i..(i + 1)], tier));
        }
        int[] holders = [3, 5, 9, 12, 20];
        for (int i = 0; i < chain.Length; i++)
        {
            for (int k = 0; k < holders.Length; k++)
            {
                int h = holders[(k + i) % holders.Length];
                Stored(h, i, (TierKind)(h % 3));
            }
        }
        var output = new List<MatchResult>();
        void Check(BlockHash[] query)
        {
            tree.Match(query, output);
            Assert.Equal(model.Match(query), output);
        }
        Check(chain);
        model.Removed(9, [chain[20]], (TierKind)0);
        tree.ApplyRemoved(9, [chain[20]], (TierKind)0);
        Check(chain);
        Stored(5, 30, TierKind.Gpu); // worker 5 (SSD) adds GPU on block 30: same workers, another mask
        Check(chain);
        for (int i = 0; i < 40; i++)
            Stored(33, i, TierKind.Host); // a sixth holder on blocks 0-39
        Check(chain);
        for (int i = 0; i < 12; i++)
            Stored(40, i, TierKind.Gpu); // a seventh: blocks 0-11 get a vector
        Check(chain);
        Check(chain[..13]);
    }

    [Fact]
    public void Index_ChainsGrowingABlockAtATime_GetEntriesSetAsideAndGiveThemUpBeforeTheArenaGrows()
    {
        // Four chains grow one block per event, round robin (decode steps of four sequences): after each chain's first
        // append, Extent - 1 entries are set aside behind it, and its next appends take them (the count of reserved
        // entries drops by one per append) instead of the tail. When the arena runs short, the reserved entries are
        // reclaimed before it grows.
        Assert.Equal(32, RadixTree.Extent);
        using var tree = new RadixTree(initialBlocks: 200);
        var model = new ReferenceIndex();
        Assert.Equal(201, tree.ArenaCapacity);
        var roots = Enumerable.Range(0, 4).Select(c => TestHashes.Chain(1, salt: 50 + c)).ToArray();
        foreach (var r in roots)
            Assert.Equal(model.Stored(0, null, r, TierKind.Gpu), tree.ApplyStored(0, null, r, TierKind.Gpu));
        Assert.Equal(0, tree.ReservedEntries); // root chains set nothing aside
        var chains = roots.Select(r => new List<BlockHash>(r)).ToArray();
        for (int step = 0; step < 10; step++)
        {
            for (int c = 0; c < 4; c++)
            {
                var next = TestHashes.Child(chains[c][^1], step);
                Assert.Equal(model.Stored(c, chains[c][^1], [next], TierKind.Host), tree.ApplyStored(c, chains[c][^1], [next], TierKind.Host));
                chains[c].Add(next);
            }
            Assert.Equal(4 * 31 - 4 * step, tree.ReservedEntries);
        }
        var output = new List<MatchResult>();
        foreach (var chain in chains)
        {
            tree.Match([.. chain], output);
            Assert.Equal(model.Match([.. chain]), output);
        }

        // 44 blocks live, 88 reserved, 68 never used: a 100-block chain needs the reserved ones, not a bigger arena.
        var big = TestHashes.Chain(100, salt: 77);
        Assert.Equal(model.Stored(9, null, big, TierKind.Ssd), tree.ApplyStored(9, null, big, TierKind.Ssd));
        Assert.Equal(0, tree.ReservedEntries);
        Assert.Equal(201, tree.ArenaCapacity);
        foreach (var chain in chains.Select(c => c.ToArray()).Append(big))
        {
            tree.Match(chain, output);
            Assert.Equal(model.Match(chain), output);
        }
        var runs = new List<StoredRun>();
        tree.Dump(runs);
        Assert.Equal(model.DumpSet(), ReferenceIndex.Flatten(runs));
    }

    [Fact]
    public void Index_Match_ZeroHashInChain_StopsThere()
    {
        // Free and reserved arena entries are all zero where the hash goes: a zero hash in a queried chain (never a
        // stored one) may land on one and must end the walk there, not match it.
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

    [Fact]
    public void Index_GrowthPreparedAhead_IsInstalledOnlyIfTheTreeDidNotChangeMeanwhile()
    {
        using var tree = new RadixTree(initialBlocks: 16); // 1024 index slots: growth is due past 704 blocks
        var model = new ReferenceIndex();
        var chains = new List<BlockHash[]>();
        void Add(int salt)
        {
            var chain = TestHashes.Chain(50, salt: salt);
            chains.Add(chain);
            Assert.Equal(model.Stored(salt % 5, null, chain, TierKind.Host), tree.ApplyStored(salt % 5, null, chain, TierKind.Host));
        }
        void CheckAll()
        {
            var output = new List<MatchResult>();
            foreach (var chain in chains)
            {
                tree.Match(chain, output);
                Assert.Equal(model.Match(chain), output);
            }
        }
        for (int c = 0; !tree.GrowthDue; c++)
            Add(c);
        Assert.Equal(1024, tree.Capacity);
        Assert.True(tree.Blocks is > 704 and <= 768);

        var prepared = tree.PrepareGrowth();
        CheckAll(); // the old index still answers
        using (var other = new RadixTree())
            Assert.Throws<ArgumentException>(() => other.CommitGrowth(prepared)); // another tree's: refused, not installed
        Assert.True(tree.CommitGrowth(prepared));
        Assert.Equal(2048, tree.Capacity);
        Assert.False(tree.GrowthDue);
        CheckAll();
        Assert.False(tree.CommitGrowth(prepared)); // once only: a second commit must not give back the live index's memory
        CheckAll();
        Add(20_000);
        CheckAll();

        // Prepared, then a block added: the copy misses it, so it is refused and the tree keeps its index.
        for (int c = chains.Count; !tree.GrowthDue; c++)
            Add(c);
        var stale = tree.PrepareGrowth();
        Add(10_000);
        Assert.False(tree.CommitGrowth(stale));
        Assert.Equal(2048, tree.Capacity);
        CheckAll();
        // A removal makes it stale too.
        var stale2 = tree.PrepareGrowth();
        Assert.Equal(1, tree.ApplyRemoved(10_000 % 5, chains[^1][^1..], TierKind.Host));
        model.Removed(10_000 % 5, chains[^1][^1..], TierKind.Host);
        Assert.False(tree.CommitGrowth(stale2));
        CheckAll();
    }

    [Fact]
    public void Index_TheAllZeroHash_IsRejected()
    {
        using var tree = new RadixTree();
        var chain = TestHashes.Chain(2);
        Assert.Equal(ApplyStatus.ZeroHash, tree.ApplyStored(0, null, [chain[0], default, chain[1]], TierKind.Gpu));
        Assert.Equal(0, tree.Blocks);
        Assert.Equal(ApplyStatus.UnknownParent, tree.ApplyStored(0, default(BlockHash), chain, TierKind.Gpu));
        Assert.Equal(1, tree.RejectedZeroHash);
        Assert.Empty(MatchOf(tree, [default]));
        Assert.Equal(0, tree.ApplyRemoved(0, [default], TierKind.Gpu));
    }

    [Fact]
    public void Index_BadArguments_ThrowWithTheReason()
    {
        using var tree = new RadixTree();
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => tree.ApplyStored(-1, null, TestHashes.Chain(1), TierKind.Gpu));
        Assert.Contains("WorkerIdOf", e.Message, StringComparison.Ordinal);
        Assert.Equal(ApplyStatus.BadTier, tree.ApplyStored(0, null, TestHashes.Chain(1), (TierKind)9));
        Assert.Throws<ArgumentNullException>(() => tree.Match(TestHashes.Chain(1), null!));
    }
    [Fact]
    public void Index_Match_ChainInReusedScatteredEntries_MatchesLikeAFreshOne()
    {
        // The arena (room for 16 blocks plus one) is used up by 16 one-block roots A; freed first to last, they go on the
        // free list so that chain B gets them last to first: every block of B sits in the entry before its parent's,
        // so Match cannot take the next entry and must ask the index. Chain C, stored after the arena doubled, lies in
        // consecutive entries again and branches off B.
        using var tree = new RadixTree(initialBlocks: 16);
        var a = Enumerable.Range(0, 16).Select(i => TestHashes.Chain(1, salt: 100 + i)[0]).ToArray();
        foreach (var root in a)
            Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(0, null, [root], TierKind.Gpu));
        Assert.Equal(16, tree.ArenaCapacity - 1);
        Assert.Equal(16, tree.ApplyRemoved(0, a, TierKind.Gpu));
        Assert.Equal(0, tree.Blocks);
        var b = TestHashes.Chain(16, salt: 2);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(1, null, b, TierKind.Host));
        Assert.Equal(17, tree.ArenaCapacity); // B reused A's entries
        var c = TestHashes.Chain(b[^1], [.. Enumerable.Range(0, 40)]);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(2, b[^1], c, TierKind.Ssd));
        Assert.True(tree.ArenaCapacity > 17);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(1, b[^1], c[..10], TierKind.Host));
        Assert.Empty(MatchOf(tree, a));
        Assert.Equal([new MatchResult(1, 16, 0, 16, 0)], MatchOf(tree, b));
        Assert.Equal([new MatchResult(1, 26, 0, 26, 0)], MatchOf(tree, [.. b, .. c]));
        Assert.Equal([new MatchResult(1, 11, 0, 11, 0)], MatchOf(tree, [b[^1], .. c]));
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(2, null, b, TierKind.Ssd));
        Assert.Equal([new MatchResult(2, 56, 0, 0, 56), new MatchResult(1, 26, 0, 26, 0)], MatchOf(tree, [.. b, .. c]));
    }

    [Fact]
    public void Index_Match_HashesSharingTheirFirstTwelveBytes_AreToldApart()
    {
        // An index slot keeps 12 of a hash's 16 bytes; Match checks the other 4 in the entry. A decoy that shares the
        // 12 bytes with the chain's second block and sits where Match first looks (the entry after block 0, the index
        // slot before the block's own) must neither match nor hide the real block.
        using var tree = new RadixTree();
        var first = new BlockHash(0x1111_2222_3333_4444UL, 0x5555_6666_7777_8888UL);
        var second = new BlockHash(0x9999_AAAA_BBBB_CCCCUL, 0x0000_0001_DDDD_EEEEUL);
        var decoy = new BlockHash(second.Hi, second.Lo ^ 0x0000_1000_0000_0000UL);
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(0, null, [first], TierKind.Gpu));
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(5, null, [decoy], TierKind.Gpu));
        Assert.Equal(ApplyStatus.Applied, tree.ApplyStored(0, first, [second], TierKind.Gpu));
        Assert.True(tree.Contains(decoy) && tree.Contains(second));
        Assert.Equal([new MatchResult(0, 2, 2, 0, 0)], MatchOf(tree, [first, second]));
        Assert.Equal([new MatchResult(0, 1, 1, 0, 0)], MatchOf(tree, [first, decoy]));
        Assert.Equal([new MatchResult(5, 1, 1, 0, 0)], MatchOf(tree, [decoy]));
        Assert.Equal(1, tree.ApplyRemoved(5, [decoy], TierKind.Gpu));
        Assert.False(tree.Contains(decoy));
        Assert.Equal([new MatchResult(0, 2, 2, 0, 0)], MatchOf(tree, [first, second]));
    }
}
