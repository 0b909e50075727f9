using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;

namespace KvFabric.Bench.Index;

// A synthetic cluster's block events: a short system prefix every worker holds, then chains of varying length that
// branch off the prefix or off each other, each held by 1-3 workers, stored in 64-block pieces as engines report them.
// `MatchChains` are full prompt-length chains (prefix included) held by three workers each: the worst-case Match walk.
public sealed class IndexWorkload
{
    public const int PieceBlocks = 64;

    public readonly record struct Event(int Worker, int Parent, int Start, int Count, TierKind Tier);

    public BlockHash[] Hashes { get; }
    public byte[] Packed { get; }
    public List<Event> Events { get; } = [];
    public List<BlockHash[]> MatchChains { get; } = [];
    public List<int[]> MatchHolders { get; } = [];
    public long BlockEvents { get; private set; }
    public int SharedBlocks { get; }

    // mixedHolders: the prompt chains' three holders report each block in their own single-block event, in an order
    // that rotates per block, so no two consecutive blocks have the same location list (Match's worst case for work).
    // interleaved: the prompt chains are reported one block at a time, block j of every chain before block j + 1 of any
    // (many sequences growing at once, as decode steps do), so no chain lies in consecutive arena entries (Match's worst
    // case for memory: every block is an index probe and an entry, two cache misses).
    public IndexWorkload(int blocks, int workers, int promptBlocks, bool mixedHolders = false, int seed = 1, bool interleaved = false)
    {
        if (workers < 4 || promptBlocks < 2 || blocks < 2 * promptBlocks)
            throw new ArgumentException($"--blocks {blocks} --workers {workers} --prompt-blocks {promptBlocks}: need workers >= 4, prompt-blocks >= 2 and blocks >= 2 x prompt-blocks");
        var rng = new Random(seed);
        Hashes = new BlockHash[blocks];
        for (int i = 0; i < blocks; i++)
            Hashes[i] = new BlockHash(Mix((ulong)i * 2 + 1 + ((ulong)seed << 40)), Mix((ulong)i * 2 + 2 + ((ulong)seed << 40)));
        Packed = new byte[(long)blocks * BlockHash.Size];
        for (int i = 0; i < blocks; i++)
            Hashes[i].WriteTo(Packed.AsSpan(i * BlockHash.Size));

        SharedBlocks = Math.Min(16, promptBlocks / 2);
        for (int w = 0; w < workers; w++)
            Add(w, -1, 0, SharedBlocks, TierKind.Gpu);
        int next = SharedBlocks;

        int matchChains = Math.Clamp(blocks / (4 * promptBlocks), 1, 64);
        int promptTail = promptBlocks - SharedBlocks;
        var starts = new int[matchChains];
        for (int c = 0; c < matchChains; c++)
        {
            starts[c] = next;
            next += promptTail;
            MatchChains.Add([.. Hashes.AsSpan(0, SharedBlocks), .. Hashes.AsSpan(starts[c], promptTail)]);
            MatchHolders.Add([.. Enumerable.Range(0, 3).Select(k => (c * 3 + k) % workers)]);
        }
        if (interleaved)
        {
            // Block j of every chain before block j + 1 of any: the chains' entries end up matchChains apart.
            for (int j = 0; j < promptTail; j++)
            {
                for (int c = 0; c < matchChains; c++)
                    AddPromptBlock(starts[c], j, MatchHolders[c], mixedHolders);
            }
        }
        else
        {
            for (int c = 0; c < matchChains; c++)
            {
                if (mixedHolders)
                {
                    for (int j = 0; j < promptTail; j++)
                        AddPromptBlock(starts[c], j, MatchHolders[c], rotate: true);
                }
                else
                {
                    for (int k = 0; k < MatchHolders[c].Length; k++)
                        AddChain(MatchHolders[c][k], SharedBlocks - 1, starts[c], promptTail, (TierKind)k);
                }
            }
        }

        int general = next;
        while (next < blocks)
        {
            int length = Math.Min(blocks - next, 32 + rng.Next(481));
            int parent = next > general && rng.Next(2) == 0 ? general + rng.Next(next - general) : SharedBlocks - 1;
            int holders = 1 + rng.Next(3);
            int first = rng.Next(workers);
            for (int k = 0; k < holders; k++)
            {
                int roll = rng.Next(100);
                var tier = roll < 50 ? TierKind.Gpu : roll < 85 ? TierKind.Host : TierKind.Ssd;
                AddChain((first + k * 7919) % workers, parent, next, length, tier);
            }
            next += length;
        }
    }

    // Block j of the prompt chain at `start`, reported by each holder in its own event; `rotate` turns the holder order
    // per block (see mixedHolders). Holder k keeps tier k either way.
    private void AddPromptBlock(int start, int j, int[] holders, bool rotate)
    {
        for (int k = 0; k < holders.Length; k++)
        {
            int h = rotate ? (k + j) % holders.Length : k;
            Add(holders[h], j == 0 ? SharedBlocks - 1 : start + j - 1, start + j, 1, (TierKind)h);
        }
    }

    private void AddChain(int worker, int parent, int start, int length, TierKind tier)
    {
        for (int offset = 0; offset < length; offset += PieceBlocks)
        {
            int count = Math.Min(PieceBlocks, length - offset);
            Add(worker, offset == 0 ? parent : start + offset - 1, start + offset, count, tier);
        }
    }

    private void Add(int worker, int parent, int start, int count, TierKind tier)
    {
        Events.Add(new Event(worker, parent, start, count, tier));
        BlockEvents += count;
    }

    /// <summary>
    /// Applies the workload to a tree whose arena was first filled with one-block roots and then emptied in creation
    /// order: every entry the workload gets comes from the free list, last freed first, so each block of a chain lies
    /// in the entry before its parent's and Match can never take the next entry (its worst case for memory, as an index
    /// long in service whose entries were freed and reused out of order). The tree must be sized for Hashes.Length.
    /// </summary>
    public void ApplyScattered(RadixTree tree)
    {
        var one = new BlockHash[1];
        for (int pass = 0; pass < 2; pass++)
        {
            for (int i = 0; i < Hashes.Length; i++)
            {
                one[0] = new BlockHash(Mix((ulong)i * 2 + 1 + (0xF111UL << 44)), Mix((ulong)i * 2 + 2 + (0xF111UL << 44)));
                if (pass == 0 && tree.ApplyStored(0, null, one, TierKind.Gpu) != ApplyStatus.Applied)
                    throw new InvalidOperationException("a filler block was rejected; the generator is wrong");
                if (pass == 1 && tree.ApplyRemoved(0, one, TierKind.Gpu) != 1)
                    throw new InvalidOperationException("a filler block was not held; the generator is wrong");
            }
        }
        ApplyTo(tree);
    }

    public void ApplyTo(RadixTree tree)
    {
        foreach (var e in Events)
        {
            BlockHash? parent = e.Parent < 0 ? null : Hashes[e.Parent];
            if (tree.ApplyStored(e.Worker, parent, Hashes.AsSpan(e.Start, e.Count), e.Tier) != ApplyStatus.Applied)
                throw new InvalidOperationException($"workload event at block {e.Start} was rejected; the generator is wrong");
        }
    }

    public IndexEvent ToIndexEvent(in Event e, uint tenant) => IndexEvent.Stored(
        tenant, e.Worker,
        e.Parent < 0 ? ReadOnlyMemory<byte>.Empty : Packed.AsMemory(e.Parent * BlockHash.Size, BlockHash.Size),
        Packed.AsMemory(e.Start * BlockHash.Size, e.Count * BlockHash.Size), e.Tier);

    // SplitMix64's finaliser: uniform 64-bit values, standing in for SHA-256 digests.
    private static ulong Mix(ulong z)
    {
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }
}
