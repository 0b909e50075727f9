using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;
using Xunit;

namespace KvFabric.Tests.Index;

public class RadixIndexTests
{
    private static CancellationToken Deadline() => new CancellationTokenSource(TimeSpan.FromSeconds(60)).Token;

    [Fact]
    public async Task Index_MalformedEvents_AreCountedByReason_AndTheWriterKeepsWorking()
    {
        using var index = new RadixIndex();
        int w = index.WorkerIdOf("node-a", "w0");
        var chain = TestHashes.Chain(3);
        byte[] packed = IndexEvent.Pack(chain);
        await index.EnqueueAsync(IndexEvent.Stored(1, w, default, packed.AsMemory(0, 15), TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, default, ReadOnlyMemory<byte>.Empty, TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Removed(1, w, packed.AsMemory(0, 33), TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, new byte[5], packed, TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, IndexEvent.Pack([TestHashes.Child(null, 99)]), packed, TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, default, packed, (TierKind)5), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, -3, default, packed, TierKind.Gpu), Deadline());
        await index.EnqueueAsync(new IndexEvent(1, w, (IndexEventKind)42, default, packed, TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, default, new byte[32], TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, default, packed, TierKind.Host), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(1, w, default, IndexEvent.Pack(chain[1..]), TierKind.Host), Deadline()); // chain[1] is not a root
        await index.FlushAsync(Deadline());

        var counters = index.Counters;
        Assert.Equal(3, counters.Rejected["hash_length"]);
        Assert.Equal(1, counters.Rejected["parent_length"]);
        Assert.Equal(1, counters.Rejected["unknown_parent"]);
        Assert.Equal(1, counters.Rejected["parent_mismatch"]);
        Assert.Equal(1, counters.Rejected["tier"]);
        Assert.Equal(1, counters.Rejected["worker"]);
        Assert.Equal(1, counters.Rejected["kind"]);
        Assert.Equal(1, counters.Rejected["zero_hash"]);
        Assert.Equal(0, counters.Rejected["exception"]);
        Assert.Equal(1, counters.AppliedEvents);
        Assert.Equal(3, counters.AppliedBlocks);
        Assert.Equal(3, counters.Blocks);
        var output = new List<MatchResult>();
        Assert.Equal(3, index.Match(1, chain, output));
        Assert.Equal([new MatchResult(w, 3, 0, 3, 0)], output);
        Assert.Equal(0, index.Match(2, chain, output)); // another tenant sees nothing
        Assert.Empty(output);
    }

    [Fact]
    public async Task Index_RemoveNode_ClearsEveryWorkerOfThatNodeInEveryTenant()
    {
        using var index = new RadixIndex();
        int a0 = index.WorkerIdOf("a", "0"), a1 = index.WorkerIdOf("a", "1"), b0 = index.WorkerIdOf("b", "0");
        Assert.Equal(a1, index.WorkerIdOf("a", "1"));
        Assert.Equal(("b", "0"), index.WorkerOf(b0));
        Assert.Throws<ArgumentOutOfRangeException>(() => index.WorkerOf(99));
        var chain = TestHashes.Chain(4);
        byte[] packed = IndexEvent.Pack(chain);
        foreach (uint tenant in new uint[] { 1, 2 })
        {
            foreach (int w in new[] { a0, a1, b0 })
                await index.EnqueueAsync(IndexEvent.Stored(tenant, w, default, packed, TierKind.Gpu), Deadline());
        }
        await index.RemoveNodeAsync("a", Deadline());
        await index.FlushAsync(Deadline());
        var output = new List<MatchResult>();
        foreach (uint tenant in new uint[] { 1, 2 })
        {
            index.Match(tenant, chain, output);
            Assert.Equal([new MatchResult(b0, 4, 4, 0, 0)], output);
        }
        await index.EnqueueAsync(IndexEvent.Cleared(2, b0, TierKind.Gpu), Deadline());
        await index.FlushAsync(Deadline());
        Assert.Equal(0, index.Match(2, chain, output));
        Assert.Equal(4, index.Counters.Blocks); // tenant 1 still has b0's chain
    }

    [Fact]
    public async Task Index_ConcurrentReaders_SeeOnlyConsistentGrowingMatches_AndTheFinalStateIsExact()
    {
        using var index = new RadixIndex(new RadixIndexOptions { QueueCapacity = 64, InitialBlocksPerTenant = 16 });
        const int Workers = 8, Chains = 60, Length = 40;
        var chains = Enumerable.Range(0, Chains).Select(c => TestHashes.Chain(Length, salt: c)).ToArray();
        using var reference = new RadixTree();
        var events = new List<IndexEvent>();
        for (int c = 0; c < Chains; c++)
        {
            for (int piece = 0; piece < Length; piece += 8)
            {
                int worker = (c + piece) % Workers;
                var parent = piece == 0 ? null : (BlockHash?)chains[c][piece - 1];
                // Stored in pieces of 8 under the previous piece; each piece by every worker up to here in order.
                for (int w = 0; w <= worker; w++)
                {
                    events.Add(IndexEvent.Stored(7, w, parent is { } p ? IndexEvent.Pack([p]) : default, IndexEvent.Pack(chains[c].AsSpan(piece, 8)), TierKind.Gpu));
                }
            }
        }
        foreach (var e in events)
        {
            BlockHash? parent = e.Parent.IsEmpty ? null : BlockHash.FromBytes(e.Parent.Span);
            var hashes = Enumerable.Range(0, e.Hashes.Length / 16).Select(i => BlockHash.FromBytes(e.Hashes.Span.Slice(i * 16, 16))).ToArray();
            reference.ApplyStored(e.Worker, parent, hashes, TierKind.Gpu);
        }

        using var stop = new CancellationTokenSource();
        var readers = Enumerable.Range(0, 3).Select(r => Task.Run(() =>
        {
            var output = new List<MatchResult>();
            var best = new int[Chains];
            long rounds = 0;
            while (!stop.IsCancellationRequested || rounds < 10)
            {
                int c = (int)(rounds++ % Chains);
                int longest = index.Match(7, chains[c], output);
                for (int i = 0; i < output.Count; i++)
                {
                    var m = output[i];
                    Assert.InRange(m.Matched, 1, Length);
                    Assert.Equal(m.Matched, m.Gpu);
                    if (i > 0)
                        Assert.True(output[i - 1].Matched > m.Matched || (output[i - 1].Matched == m.Matched && output[i - 1].WorkerId < m.WorkerId));
                }
                // Only Stored events: what a reader sees for a chain never shrinks.
                Assert.True(longest >= best[c], $"chain {c}: match went from {best[c]} to {longest}");
                best[c] = longest;
            }
            return rounds;
        })).ToArray();

        foreach (var e in events)
            await index.EnqueueAsync(e, Deadline());
        await index.FlushAsync(Deadline());
        await stop.CancelAsync();
        long[] rounds = await Task.WhenAll(readers).WaitAsync(TimeSpan.FromSeconds(60));
        Assert.All(rounds, r => Assert.True(r >= 10));

        var got = new List<MatchResult>();
        var want = new List<MatchResult>();
        foreach (var chain in chains)
        {
            index.Match(7, chain, got);
            reference.Match(chain, want);
            Assert.Equal(want, got);
        }
        Assert.Equal(reference.Blocks, index.Counters.Blocks);
        Assert.Equal(events.Count, index.Counters.AppliedEvents);
        Assert.Equal(0, index.Counters.RejectedTotal);
    }

    [Fact]
    public async Task Index_GrowsItsTablesAheadOfTheReadersLock_AndAnswersTheSameThroughout()
    {
        // One 8-block event per batch (each flushed): the tree crosses the load at which growth is due at a batch
        // boundary, so the writer builds the bigger index before taking the lock, every time, while a reader Matches.
        using var index = new RadixIndex(new RadixIndexOptions { InitialBlocksPerTenant = 16 });
        var chains = Enumerable.Range(0, 40).Select(c => TestHashes.Chain(80, salt: 500 + c)).ToArray();
        using var stop = new CancellationTokenSource();
        var reader = Task.Run(() =>
        {
            var output = new List<MatchResult>();
            long calls = 0;
            while (!stop.IsCancellationRequested)
            {
                int longest = index.Match(3, chains[calls++ % chains.Length], output);
                Assert.Equal(output.Count == 0 ? 0 : output[0].Matched, longest);
            }
            return calls;
        });
        foreach (var chain in chains)
        {
            for (int piece = 0; piece < 80; piece += 8)
            {
                var parent = piece == 0 ? default : IndexEvent.Pack([chain[piece - 1]]);
                await index.EnqueueAsync(IndexEvent.Stored(3, 1, parent, IndexEvent.Pack(chain.AsSpan(piece, 8)), TierKind.Gpu), Deadline());
                await index.FlushAsync(Deadline());
            }
        }
        await stop.CancelAsync();
        Assert.True(await reader.WaitAsync(TimeSpan.FromSeconds(60)) > 0);
        Assert.True(index.GrowthsAhead >= 2, $"{index.GrowthsAhead} growths ahead"); // 1024 -> 2048 -> 4096 slots for 3200 blocks
        var output = new List<MatchResult>();
        foreach (var chain in chains)
        {
            Assert.Equal(80, index.Match(3, chain, output));
            Assert.Equal([new MatchResult(1, 80, 80, 0, 0)], output);
        }
    }

    [Fact]
    public async Task Index_Dump_ThroughTheIndex_ReplaysIntoAnEqualIndex()
    {
        using var index = new RadixIndex();
        var trunk = TestHashes.Chain(3);
        var left = TestHashes.Chain(trunk[^1], 1, 2);
        var right = TestHashes.Chain(trunk[^1], 3);
        await index.EnqueueAsync(IndexEvent.Stored(5, 0, default, IndexEvent.Pack(trunk), TierKind.Gpu), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(5, 1, IndexEvent.Pack([trunk[^1]]), IndexEvent.Pack(left), TierKind.Host), Deadline());
        await index.EnqueueAsync(IndexEvent.Stored(5, 0, IndexEvent.Pack([trunk[^1]]), IndexEvent.Pack(right), TierKind.Ssd), Deadline());
        await index.FlushAsync(Deadline());
        var runs = new List<StoredRun>();
        index.Dump(5, runs);
        Assert.Equal(3, runs.Count); // one run per (worker, tier) chain
        using var copy = new RadixIndex();
        foreach (var run in runs)
        {
            var parent = run.Parent is { } p ? IndexEvent.Pack([p]) : default;
            await copy.EnqueueAsync(IndexEvent.Stored(5, run.Worker, parent, IndexEvent.Pack(run.Hashes), run.Tier), Deadline());
        }
        await copy.FlushAsync(Deadline());
        Assert.Equal(0, copy.Counters.RejectedTotal);
        var a = new List<MatchResult>();
        var b = new List<MatchResult>();
        foreach (var chain in new[] { trunk.Concat(left).ToArray(), trunk.Concat(right).ToArray() })
        {
            index.Match(5, chain, a);
            copy.Match(5, chain, b);
            Assert.Equal(a, b);
        }
    }

    [Fact]
    public async Task Index_AfterDispose_EnqueueAndFlushSayItIsDisposed()
    {
        var index = new RadixIndex();
        await index.FlushAsync(Deadline());
        index.Dispose();
        Assert.False(index.TryEnqueue(IndexEvent.Cleared(1, 0, null)));
        await Assert.ThrowsAsync<ObjectDisposedException>(() => index.FlushAsync(Deadline()));
        Assert.Throws<ObjectDisposedException>(() => index.Match(1, TestHashes.Chain(1), []));
    }
}
