using KvFabric.Tiers.Policies;

namespace KvFabric.Tiers.Replay;

// Offline references for a replay, with the same prefix semantics and the same counting as the cache under test.
public static class ReplayOracles
{
    private const int Never = int.MaxValue;

    // An unbounded cache: every block ever put stays. The ceiling any policy could reach.
    public static ReplayResult Infinite(ReplayTrace trace, int maxRequests = int.MaxValue)
    {
        ArgumentNullException.ThrowIfNull(trace);
        int requests = Math.Min(maxRequests, trace.Count);
        var cached = new bool[trace.DistinctBlocks];
        var result = new ReplayResult("infinite", 1);
        for (int r = 0; r < requests; r++)
        {
            var chain = trace.DenseChain(r);
            int matched = 0;
            while (matched < chain.Length && cached[chain[matched]])
                matched++;
            result.Count(trace, trace[r], matched, tierOfMatched: null);
            foreach (int b in chain[..trace.FullBlocks(r)])
                cached[b] = true;
        }
        return result;
    }

    // Belady's MIN with bypass (Belady 1966; bypass as in the offline-optimal analyses of admission), on one cache
    // of capacityBlocks blocks, under prefix semantics:
    //  * Time is the request index. A block's next use is the index of the next request whose chain contains it
    //    (never: +infinity). After a request's lookup its chain is put in order: a resident block's next use is
    //    updated; a missing block with no next use is not admitted; otherwise, when the cache is full, the resident
    //    block of farthest next use is evicted if the new block's next use is nearer, else the new block bypasses.
    //  * Ties between next uses go to the deeper block (evicted or bypassed first). Chain ids are chained hashes, so
    //    every request holding a block holds its parent: a parent's next use is never later than its child's, and
    //    with this tie rule MIN never evicts a parent before its child; the cache stays prefix-closed on its own.
    //  * A block that is not admitted ends the chain's put (its descendants could not be reached by a prefix, and
    //    each of them would lose to the same victim anyway).
    // MIN is optimal for block hits with uniform block sizes; with prefix semantics and a partial last block it is a
    // close reference, not a proven bound on token hits (docs/tiers-policies.md).
    public static ReplayResult Belady(ReplayTrace trace, int capacityBlocks, int maxRequests = int.MaxValue)
    {
        ArgumentNullException.ThrowIfNull(trace);
        ArgumentOutOfRangeException.ThrowIfLessThan(capacityBlocks, 1);
        int requests = Math.Min(maxRequests, trace.Count);

        // nextUse[k] for the k-th block reference of the trace, by a backward pass.
        var nextUse = new int[trace.BlockReferences];
        var following = new int[trace.DistinctBlocks];
        following.AsSpan().Fill(Never);
        for (int r = requests - 1; r >= 0; r--)
        {
            var req = trace[r];
            var chain = trace.DenseChain(r);
            // A use is a lookup that could match the block: any position of the chain, the partial last one included.
            for (int i = 0; i < chain.Length; i++)
            {
                nextUse[req.ChainStart + i] = following[chain[i]];
                following[chain[i]] = r;
            }
        }

        // Resident blocks, farthest next use first (deeper first on ties): a min-heap on (-next use, -depth).
        var heap = new HandleHeap(trace.DistinctBlocks);
        var result = new ReplayResult($"belady-{capacityBlocks}", 1);
        for (int r = 0; r < requests; r++)
        {
            var req = trace[r];
            var chain = trace.DenseChain(r);
            int matched = 0;
            while (matched < chain.Length && heap.Contains(chain[matched]))
                matched++;
            result.Count(trace, req, matched, tierOfMatched: null);
            int full = trace.FullBlocks(r);
            for (int i = 0; i < chain.Length; i++)
            {
                int b = chain[i];
                int next = nextUse[req.ChainStart + i];
                if (heap.Contains(b))
                {
                    heap.SetKey(b, -(double)next, -i);
                    continue;
                }
                if (next == Never || i >= full)
                    break;
                if (heap.Count >= capacityBlocks)
                {
                    heap.TryPeek(out int victim);
                    double victimNext = -heap.PriorityOf(victim);
                    long victimDepth = -heap.TieOf(victim);
                    if (next > victimNext || (next == victimNext && i >= victimDepth))
                        break;
                    heap.Remove(victim);
                }
                heap.SetKey(b, -(double)next, -i);
                heap.Insert(b);
            }
        }
        return result;
    }
}
