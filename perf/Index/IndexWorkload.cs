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
    // that rotates per block, so no two consecutive blocks have the same location list (Match's worst case).
    public IndexWorkload(int blocks, int workers, int promptBlocks, bool mixedHolders = false, int seed = 1)
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
        for (int c = 0; c < matchChains; c++)
        {
            int start = next;
            int length = promptBlocks - SharedBlocks;
            next += length;
            var holders = Enumerable.Range(0, 3).Select(k => (c * 3 + k) % workers).ToArray();
            if (mixedHolders)
            {
                for (int j = 0; j < length; j++)
                {
                    for (int k = 0; k < holders.Length; k++)
                    {
                        int h = (k + j) % holders.Length;
                        Add(holders[h], j == 0 ? SharedBlocks - 1 : start + j - 1, start + j, 1, (TierKind)h);
                    }
                }
            }
            else
            {
                for (int k = 0; k < holders.Length; k++)
                    AddChain(holders[k], SharedBlocks - 1, start, length, (TierKind)k);
            }
            MatchChains.Add([.. Hashes.AsSpan(0, SharedBlocks), .. Hashes.AsSpan(start, length)]);
            MatchHolders.Add(holders);
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
