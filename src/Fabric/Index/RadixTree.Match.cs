using System.Runtime.CompilerServices;
using System.Numerics;
using System.Runtime.Intrinsics;
using System.Runtime.Intrinsics.X86;
using KvFabric.Blocks;

namespace KvFabric.Index;

public sealed unsafe partial class RadixTree
{
    // Match's prefetch pipeline: blocks between its stages, and the ring of resolved entries (a power of two > Stage).
    private const int Stage = 16;
    private const int Ring = 32;
    private const int OverflowAhead = 8; // blocks ahead of the match stage whose overflow vector is prefetched
    private const int MissWindow = 8;    // two guesses missed within this many blocks turn a walk scattered

    // Where Match's walk stands: blocks left in scattered mode (0: guessing), and the last block whose guess missed.
    private struct Walk
    {
        public int Scattered;
        public int LastMiss;
    }
    private const int Stride = 4; // scratch ints per worker: stamp, matched, gpu, host (stamp and matched form one long)

    // What a block adds to a worker's (gpu | host << 32) counters, by tier mask: the fastest tier held counts.
    private static ReadOnlySpan<long> TierStep => [0, 1, 1L << 32, 1, 0, 1, 1L << 32, 1];

    // Per-thread Match state, indexed by worker id and stamped by a generation so that nothing is cleared per call.
    private sealed class MatchScratch
    {
        public int[] State = new int[Stride * 64];
        public int[] Candidates = new int[64];
        public ulong[] Keys = new ulong[64];
        public int Generation;
    }

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
        int n = chain.Length;
        int longest = 0;
        int candidates = 0;

        // The geometry in locals: stores through `state` could alias fields as far as the JIT knows.
        var geo = new Geometry(_index, _arena, _mask, 64 - _bits, _arenaCapacity);
        fixed (int* state = scratch.State)
        fixed (uint* pool = _pool)
        {
            // A two-stage pipeline: block i + Stage is resolved to its entry, block i is matched. A chain stored in one
            // go lies in consecutive arena entries, so block k is first tried at the entry after block k - 1's (a
            // sequential read the prefetcher streams, helped by a prefetch Stage entries ahead); only when that entry
            // holds another hash does the index answer, and when that keeps happening the walk goes "scattered" for a
            // while: index slots are prefetched Stage blocks before they are needed, entries as soon as resolved.
            uint* ring = stackalloc uint[Ring];
            var walk = new Walk { LastMiss = int.MinValue / 2 };
            ring[0] = geo.Lookup(chain[0]);
            for (int k = 1; k <= Stage && k < n; k++)
                geo.Step(chain, k, ring, ref walk);

            // Block 0 enrols every worker that holds it.
            uint r0 = geo.Verify(chain[0], ring[0]);
            if (r0 == 0)
                return 0;
            Entry* e = geo.Arena + r0;
            for (int k = 0; k < InlineLocations; k++)
            {
                if (e->Loc[k] != 0)
                    Enrol(state, e->Loc[k], gen, scratch, ref candidates);
            }
            if (e->Overflow != 0)
            {
                uint* f = pool + e->Overflow;
                int count = VectorCount(f[0]);
                for (int k = 1; k <= count; k++)
                    Enrol(state, f[k], gen, scratch, ref candidates);
            }
            if (candidates == 0)
                return 0;
            longest = 1;

            // Runs of blocks with the very same location list (same workers, same tiers, same order: a worker stored the
            // chain in one go) are not extended block by block: when every holder of the previous block extended, the
            // same holders extend again, so the run is counted and applied once when it ends. A system prefix held by a
            // thousand workers then costs one 4 KiB compare per block instead of a thousand updates.
            Entry* prev = e;
            bool prevAll = true;
            int run = 0;
            for (int i = 1; i < n; i++)
            {
                if (i + Stage < n)
                    geo.Step(chain, i + Stage, ring, ref walk);
                if (i + OverflowAhead < n)
                    geo.PrefetchOverflow(ring[(i + OverflowAhead) & (Ring - 1)], pool);
                uint r = geo.Verify(chain[i], ring[i & (Ring - 1)]);
                if (r != 0)
                {
                    e = geo.Arena + r;
                    if (prevAll && SameLocations(prev, e, pool))
                    {
                        run++;
                        longest = i + 1;
                        continue;
                    }
                }
                if (run > 0)
                {
                    ApplyRun(state, prev, pool, run);
                    run = 0;
                }
                if (r == 0)
                    break;
                int extended = Extend(state, e->Loc[0], i, gen) + Extend(state, e->Loc[1], i, gen) + Extend(state, e->Loc[2], i, gen)
                    + Extend(state, e->Loc[3], i, gen) + Extend(state, e->Loc[4], i, gen) + Extend(state, e->Loc[5], i, gen);
                int total = (e->Loc[0] != 0 ? 1 : 0) + (e->Loc[1] != 0 ? 1 : 0) + (e->Loc[2] != 0 ? 1 : 0)
                    + (e->Loc[3] != 0 ? 1 : 0) + (e->Loc[4] != 0 ? 1 : 0) + (e->Loc[5] != 0 ? 1 : 0);
                if (e->Overflow != 0)
                {
                    uint* f = pool + e->Overflow;
                    int count = VectorCount(f[0]);
                    total += count;
                    for (int k = 1; k <= count; k++)
                        extended += Extend(state, f[k], i, gen);
                }
                if (extended == 0)
                    break;
                longest = i + 1;
                prev = e;
                prevAll = extended == total;
            }
            if (run > 0)
                ApplyRun(state, prev, pool, run);
        }

        // Sorted as primitive keys (longest first, then worker id): several times faster than a comparison delegate when
        // a shared prefix enrols a thousand workers.
        int[] list = scratch.Candidates;
        if (scratch.Keys.Length < candidates)
            scratch.Keys = new ulong[scratch.Candidates.Length];
        var keys = scratch.Keys.AsSpan(0, candidates);
        int[] st = scratch.State;
        for (int c = 0; c < candidates; c++)
        {
            int w = list[c];
            keys[c] = (ulong)(uint)(int.MaxValue - st[w * Stride + 1]) << 32 | (uint)w;
        }
        keys.Sort();
        if (output.Capacity < candidates)
            output.Capacity = candidates;
        foreach (ulong key in keys)
        {
            int w = (int)(uint)key;
            int s = w * Stride;
            int matched = st[s + 1], gpu = st[s + 2], host = st[s + 3];
            output.Add(new MatchResult(w, matched, gpu, host, matched - gpu - host));
        }
        return longest;
    }

    // The same workers with the same tier masks, inline and in the vector. Usually in the same order too (a worker
    // stored the chain in one go): three word compares. Holders that reported each block in their own event may have
    // created the entries in different orders; for blocks with no vector, the inline sets are compared (SameInlineSet).
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static bool SameLocations(Entry* a, Entry* b, uint* pool)
    {
        ulong* la = (ulong*)&a->Loc, lb = (ulong*)&b->Loc;
        if (la[0] != lb[0] || la[1] != lb[1] || la[2] != lb[2])
            return a->Overflow == 0 && b->Overflow == 0 && SameInlineSet(a, b);
        if (a->Overflow == 0 || b->Overflow == 0)
            return a->Overflow == b->Overflow;
        uint* va = pool + a->Overflow, vb = pool + b->Overflow;
        int count = VectorCount(va[0]);
        return count == VectorCount(vb[0]) && new ReadOnlySpan<uint>(va + 1, count).SequenceEqual(new ReadOnlySpan<uint>(vb + 1, count));
    }

    // Whether the six inline locations of a and b hold the same set (a worker appears at most once per entry, so equal
    // counts and every location of b found in a suffice).
    private static bool SameInlineSet(Entry* a, Entry* b)
    {
        uint* la = (uint*)&a->Loc, lb = (uint*)&b->Loc;
        if (Vector256.IsHardwareAccelerated)
        {
            // Lanes 0-5 are the locations (6 and 7, the vector offset and the children count, are masked off): b's
            // lanes found among a's six, without a branch per pair.
            var vb = Vector256.Load(lb);
            var found = Vector256.Equals(vb, Vector256.Create(la[0])) | Vector256.Equals(vb, Vector256.Create(la[1]))
                | Vector256.Equals(vb, Vector256.Create(la[2])) | Vector256.Equals(vb, Vector256.Create(la[3]))
                | Vector256.Equals(vb, Vector256.Create(la[4])) | Vector256.Equals(vb, Vector256.Create(la[5]));
            uint heldB = ~Vector256.Equals(vb, Vector256<uint>.Zero).ExtractMostSignificantBits() & 0x3F;
            uint heldA = ~Vector256.Equals(Vector256.Load(la), Vector256<uint>.Zero).ExtractMostSignificantBits() & 0x3F;
            return (heldB & ~found.ExtractMostSignificantBits()) == 0 && BitOperations.PopCount(heldA) == BitOperations.PopCount(heldB);
        }
        int inA = 0, inB = 0;
        for (int k = 0; k < InlineLocations; k++)
        {
            inA += la[k] != 0 ? 1 : 0;
            uint loc = lb[k];
            if (loc == 0)
                continue;
            inB++;
            if (la[0] != loc && la[1] != loc && la[2] != loc && la[3] != loc && la[4] != loc && la[5] != loc)
                return false;
        }
        return inA == inB;
    }

    // Applies `run` further blocks held exactly as `e` is to every holder of `e` (all of which extended through it).
    private static void ApplyRun(int* state, Entry* e, uint* pool, int run)
    {
        for (int k = 0; k < InlineLocations; k++)
            AddRun(state, e->Loc[k], run);
        if (e->Overflow != 0)
        {
            uint* f = pool + e->Overflow;
            int count = VectorCount(f[0]);
            for (int k = 1; k <= count; k++)
                AddRun(state, f[k], run);
        }
    }

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static void AddRun(int* state, uint loc, int run)
    {
        if (loc == 0)
            return;
        int* s = state + ((int)(loc >> 3) - 1) * Stride;
        s[1] += run;
        *(long*)(s + 2) += TierStep[(int)(loc & 7)] * run;
    }

    private static void Enrol(int* state, uint loc, int gen, MatchScratch scratch, ref int candidates)
    {
        int w = (int)(loc >> 3) - 1;
        int* s = state + w * Stride;
        s[0] = gen;
        s[1] = 1;
        s[2] = (loc & 1) != 0 ? 1 : 0;
        s[3] = (loc & 3) == 2 ? 1 : 0;
        if (candidates == scratch.Candidates.Length)
            Array.Resize(ref scratch.Candidates, 2 * candidates);
        scratch.Candidates[candidates++] = w;
    }

    // Extends the worker's run if it held every earlier block; 1 if it did. An empty location (0) is skipped first.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private static int Extend(int* state, uint loc, int i, int gen)
    {
        if (loc == 0)
            return 0;
        // Stamp and matched length compared as one 64-bit word; the GPU and host counts bumped as one (see TierStep).
        int* s = state + ((int)(loc >> 3) - 1) * Stride;
        if (*(long*)s != ((long)i << 32 | (uint)gen))
            return 0;
        s[1] = i + 1;
        *(long*)(s + 2) += TierStep[(int)(loc & 7)];
        return 1;
    }

    private readonly struct Geometry(Slot* index, Entry* arena, long mask, int shift, uint arenaCapacity)
    {
        public readonly Entry* Arena = arena;
        private readonly Slot* _index = index;
        private readonly long _mask = mask;
        private readonly int _shift = shift;
        private readonly uint _arenaCapacity = arenaCapacity;

        // Resolves block k into the ring; a scattered walk first prefetches the index slot of block k + Stage.
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void Step(ReadOnlySpan<BlockHash> chain, int k, uint* ring, ref Walk walk)
        {
            if (walk.Scattered > 0)
            {
                if (k + Stage < chain.Length)
                    PrefetchSlot(chain[k + Stage].Hi);
                walk.Scattered--;
            }
            ring[k & (Ring - 1)] = Resolve(chain, k, ring[(k - 1) & (Ring - 1)], ref walk);
        }

        // Block k's entry given block k - 1's (0: absent, and then so is everything after it). While the walk follows
        // the arena, the entry after the previous one is tried first. One that holds another hash is usually a jump
        // to the chain's next run of entries (a chain stored in pieces, or grown a few blocks at a time into entries
        // set aside for it): the index answers at once and the walk keeps guessing. A second such block within
        // MissWindow blocks turns the walk scattered: it asks the index for every block (the slots prefetched Stage
        // blocks ahead; the entry after the previous one is a line nobody prefetched) and returns to guessing once
        // about 2 x Stage blocks in a row were found in consecutive entries.
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        private uint Resolve(ReadOnlySpan<BlockHash> chain, int k, uint previous, ref Walk walk)
        {
            if (previous == 0)
                return 0;
            BlockHash h = chain[k];
            uint guess = previous + 1;
            if (walk.Scattered == 0)
            {
                if (guess < _arenaCapacity)
                {
                    Entry* e = Arena + guess;
                    if (e->Hi == h.Hi && e->Lo == h.Lo)
                    {
                        if (Sse.IsSupported)
                            Sse.Prefetch0(e + Stage); // a hint: never faults, even past the mapping
                        return guess;
                    }
                }
                return Miss(chain, k, ref walk);
            }
            uint r = Lookup(h);
            if (r != guess)
                walk.Scattered = 2 * Stage;
            return r;
        }

        // The entry after the previous one holds another hash: the index answers. A second miss within MissWindow
        // blocks turns the walk scattered, prefetching the next Stage blocks' slots at once (then Step keeps one slot
        // per block in flight).
        [MethodImpl(MethodImplOptions.NoInlining)]
        private uint Miss(ReadOnlySpan<BlockHash> chain, int k, ref Walk walk)
        {
            if (k - walk.LastMiss <= MissWindow)
            {
                int end = Math.Min(chain.Length, k + Stage + 1);
                for (int j = k + 1; j < end; j++)
                    PrefetchSlot(chain[j].Hi);
                walk.Scattered = 2 * Stage;
            }
            walk.LastMiss = k;
            return Lookup(chain[k]);
        }

        // The entry whose slot carries the hash's first 12 bytes (Verify checks the rest once the entry is in cache).
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public uint Lookup(BlockHash h)
        {
            long i = (long)((h.Hi * Fibonacci) >> _shift);
            uint tag = (uint)h.Lo;
            while (true)
            {
                Slot* s = _index + i;
                if (s->Ref == 0)
                    return 0;
                if (s->Hi == h.Hi && s->Tag == tag)
                {
                    if (Sse.IsSupported)
                        Sse.Prefetch0(Arena + s->Ref);
                    return s->Ref;
                }
                i = (i + 1) & _mask;
            }
        }

        // The resolved entry if it really is the hash's; else the exact answer (two hashes sharing 12 bytes).
        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public uint Verify(BlockHash h, uint r)
        {
            if (r == 0 || Arena[r].Lo == h.Lo)
                return r;
            return Exact(h);
        }

        [MethodImpl(MethodImplOptions.NoInlining)]
        private uint Exact(BlockHash h)
        {
            long i = (long)((h.Hi * Fibonacci) >> _shift);
            while (true)
            {
                Slot* s = _index + i;
                if (s->Ref == 0)
                    return 0;
                if (s->Hi == h.Hi && Arena[s->Ref].Lo == h.Lo)
                    return s->Ref;
                i = (i + 1) & _mask;
            }
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void PrefetchSlot(ulong hi)
        {
            if (Sse.IsSupported)
                Sse.Prefetch0(_index + (long)((hi * Fibonacci) >> _shift));
        }

        [MethodImpl(MethodImplOptions.AggressiveInlining)]
        public void PrefetchOverflow(uint r, uint* pool)
        {
            if (r != 0 && Arena[r].Overflow != 0 && Sse.IsSupported)
                Sse.Prefetch0(pool + Arena[r].Overflow);
        }
    }
}
