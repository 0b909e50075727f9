using System.Runtime.Intrinsics.X86;
using KvFabric.Blocks;

namespace KvFabric.Index;

public sealed unsafe partial class RadixTree
{
    // How far ahead Match prefetches table slots: enough misses in flight to cover memory latency on a big table.
    private const int PrefetchDistance = 12;

    // Per-thread Match state, indexed by worker id and stamped by a generation so that nothing is cleared per call.
    private sealed class MatchScratch
    {
        public int[] State = new int[Stride * 64]; // per worker: stamp, matched, gpu, host
        public int[] Candidates = new int[64];
        public int Generation;
    }

    private const int Stride = 4;

    [ThreadStatic]
    private static MatchScratch? t_scratch;

    // Per worker: the length of the longest prefix of `chain` it holds entirely, split by the fastest tier of each block.
    // Sorted by Matched (descending) then WorkerId; workers that hold no prefix are left out. Allocates nothing once the
    // thread's scratch and `output` have grown to the worker count. Returns the longest match.
    public int Match(ReadOnlySpan<BlockHash> chain, List<MatchResult> output)
    {
        ArgumentNullException.ThrowIfNull(output);
        output.Clear();
        if (chain.IsEmpty || _count == 0)
            return 0;
        var scratch = t_scratch ??= new MatchScratch();
        if (scratch.State.Length < Stride * _workerLimit)
            scratch.State = new int[Stride * Math.Max(_workerLimit, scratch.State.Length / Stride * 2)];
        if (++scratch.Generation == int.MaxValue)
        {
            Array.Clear(scratch.State);
            scratch.Generation = 1;
        }
        int gen = scratch.Generation;
        int[] state = scratch.State;
        uint[] pool = _pool;

        for (int k = 0; k < PrefetchDistance && k < chain.Length; k++)
            Prefetch(chain[k].Hi);

        int candidates = 0;
        int longest = 0;
        for (int i = 0; i < chain.Length; i++)
        {
            if (i + PrefetchDistance < chain.Length)
                Prefetch(chain[i + PrefetchDistance].Hi);
            long slot = Find(chain[i].Hi, chain[i].Lo);
            if (slot < 0)
                break;
            ref Entry e = ref _table[slot];
            int extended = 0;
            uint loc = e.Loc0;
            if (loc != 0)
                extended += Extend(state, loc, i, gen, scratch, ref candidates);
            for (uint node = e.Overflow; node != 0; node = pool[node * NodeUints + NextField])
            {
                int b = (int)(node * NodeUints);
                for (int f = 0; f < NextField; f++)
                {
                    loc = pool[b + f];
                    if (loc != 0)
                        extended += Extend(state, loc, i, gen, scratch, ref candidates);
                }
            }
            if (extended == 0)
                break;
            longest = i + 1;
        }

        int[] list = scratch.Candidates;
        for (int c = 0; c < candidates; c++)
        {
            int w = list[c];
            int s = w * Stride;
            int matched = state[s + 1], gpu = state[s + 2], host = state[s + 3];
            output.Add(new MatchResult(w, matched, gpu, host, matched - gpu - host));
        }
        output.Sort(static (a, b) => a.Matched != b.Matched ? b.Matched.CompareTo(a.Matched) : a.WorkerId.CompareTo(b.WorkerId));
        return longest;
    }

    // Extends the worker's run if it held every earlier block; block 0 enrols the candidates.
    private static int Extend(int[] state, uint loc, int i, int gen, MatchScratch scratch, ref int candidates)
    {
        int w = (int)(loc >> 3) - 1;
        int s = w * Stride;
        if (i == 0)
        {
            state[s] = gen;
            state[s + 1] = 0;
            state[s + 2] = 0;
            state[s + 3] = 0;
            if (candidates == scratch.Candidates.Length)
                Array.Resize(ref scratch.Candidates, 2 * candidates);
            scratch.Candidates[candidates++] = w;
        }
        else if (state[s] != gen || state[s + 1] != i)
        {
            return 0;
        }
        state[s + 1] = i + 1;
        uint tiers = loc & 7;
        if ((tiers & 1) != 0)
            state[s + 2]++;
        else if ((tiers & 2) != 0)
            state[s + 3]++;
        return 1;
    }

    private void Prefetch(ulong hi)
    {
        if (Sse.IsSupported)
            Sse.Prefetch0(_table + Home(hi));
    }
}
