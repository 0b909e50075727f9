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

        var heap = new FarthestFirstHeap(trace.DistinctBlocks);
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
                    heap.Update(b, next, i);
                    continue;
                }
                if (next == Never || i >= full)
                    break;
                if (heap.Count >= capacityBlocks)
                {
                    heap.PeekFarthest(out int victim, out int victimNext, out int victimDepth);
                    if (next > victimNext || (next == victimNext && i >= victimDepth))
                        break;
                    heap.Remove(victim);
                }
                heap.Insert(b, next, i);
            }
        }
        return result;
    }

    // Max-heap of resident blocks by (next use, depth), indexed by dense block id.
    private sealed class FarthestFirstHeap
    {
        private readonly int[] _heap;
        private readonly int[] _position;
        private readonly int[] _next;
        private readonly int[] _depth;

        public FarthestFirstHeap(int blocks)
        {
            _heap = new int[blocks];
            _position = new int[blocks];
            _position.AsSpan().Fill(-1);
            _next = new int[blocks];
            _depth = new int[blocks];
        }

        public int Count { get; private set; }

        public bool Contains(int b) => _position[b] >= 0;

        public void PeekFarthest(out int block, out int next, out int depth)
        {
            block = _heap[0];
            next = _next[block];
            depth = _depth[block];
        }

        public void Insert(int b, int next, int depth)
        {
            _next[b] = next;
            _depth[b] = depth;
            _heap[Count] = b;
            _position[b] = Count;
            Count++;
            SiftUp(Count - 1);
        }

        public void Update(int b, int next, int depth)
        {
            _next[b] = next;
            _depth[b] = depth;
            SiftUp(_position[b]);
            SiftDown(_position[b]);
        }

        public void Remove(int b)
        {
            int i = _position[b];
            _position[b] = -1;
            Count--;
            if (i == Count)
                return;
            int last = _heap[Count];
            _heap[i] = last;
            _position[last] = i;
            SiftUp(i);
            SiftDown(_position[last]);
        }

        private bool Farther(int a, int b) => _next[a] > _next[b] || (_next[a] == _next[b] && _depth[a] > _depth[b]);

        private void SiftUp(int i)
        {
            int b = _heap[i];
            while (i > 0)
            {
                int parent = (i - 1) >> 1;
                if (!Farther(b, _heap[parent]))
                    break;
                _heap[i] = _heap[parent];
                _position[_heap[i]] = i;
                i = parent;
            }
            _heap[i] = b;
            _position[b] = i;
        }

        private void SiftDown(int i)
        {
            int b = _heap[i];
            while (true)
            {
                int child = 2 * i + 1;
                if (child >= Count)
                    break;
                if (child + 1 < Count && Farther(_heap[child + 1], _heap[child]))
                    child++;
                if (!Farther(_heap[child], b))
                    break;
                _heap[i] = _heap[child];
                _position[_heap[i]] = i;
                i = child;
            }
            _heap[i] = b;
            _position[b] = i;
        }
    }
}
