using Xunit;
using System.Security.Cryptography;
using KvFabric.Blocks;
using KvFabric.Index;
using KvFabric.Tiers;

namespace KvFabric.Tests.Index;

// Chained test hashes: a block's hash is SHA-256(parent || token), so a token path from the root names one chain and
// shared token prefixes give shared block prefixes, as real prompts do.
internal static class TestHashes
{
    public static BlockHash Child(BlockHash? parent, int token)
    {
        Span<byte> input = stackalloc byte[20];
        input.Clear();
        parent?.WriteTo(input);
        BitConverter.TryWriteBytes(input[16..], token);
        Span<byte> digest = stackalloc byte[32];
        SHA256.HashData(input, digest);
        return BlockHash.FromBytes(digest[..16]);
    }

    public static BlockHash[] Chain(BlockHash? parent, params int[] tokens)
    {
        var chain = new BlockHash[tokens.Length];
        for (int i = 0; i < tokens.Length; i++)
            parent = chain[i] = Child(parent, tokens[i]);
        return chain;
    }

    public static BlockHash[] Chain(int length, int salt = 0)
    {
        var tokens = new int[length];
        for (int i = 0; i < length; i++)
            tokens[i] = salt * 1_000_003 + i;
        return Chain(null, tokens);
    }
}

// The brute-force model the tree is checked against: per block its parent and per worker a tier mask.
internal sealed class ReferenceIndex
{
    private readonly Dictionary<BlockHash, BlockHash?> _parent = [];
    private readonly Dictionary<BlockHash, Dictionary<int, int>> _holders = [];

    public IEnumerable<BlockHash> KnownBlocks => _parent.Keys;

    private bool IsHeld(BlockHash h) => _holders.TryGetValue(h, out var w) && w.Count > 0;

    // An entry exists while someone holds it or something below it exists.
    public HashSet<BlockHash> Existing()
    {
        var set = new HashSet<BlockHash>();
        foreach (var (h, w) in _holders)
        {
            if (w.Count == 0)
                continue;
            BlockHash? cur = h;
            while (cur is { } c && set.Add(c))
                cur = _parent[c];
        }
        return set;
    }

    public long Locations => _holders.Values.Sum(w => w.Count);

    public ApplyStatus Stored(int worker, BlockHash? parent, BlockHash[] hashes, TierKind tier)
    {
        if (parent is { } p && !Existing().Contains(p))
            return ApplyStatus.UnknownParent;
        BlockHash? prev = parent;
        foreach (var h in hashes)
        {
            _parent[h] = prev;
            if (!_holders.TryGetValue(h, out var w))
                _holders[h] = w = [];
            w[worker] = w.GetValueOrDefault(worker) | (1 << (int)tier);
            prev = h;
        }
        return ApplyStatus.Applied;
    }

    public void Removed(int worker, IEnumerable<BlockHash> hashes, TierKind tier)
    {
        foreach (var h in hashes)
            Clear(h, worker, 1 << (int)tier);
    }

    public void ClearWorker(int worker, TierKind? tier)
    {
        foreach (var h in _holders.Keys.ToList())
            Clear(h, worker, tier is { } t ? 1 << (int)t : 7);
    }

    private void Clear(BlockHash h, int worker, int bits)
    {
        if (!_holders.TryGetValue(h, out var w) || !w.TryGetValue(worker, out int mask))
            return;
        mask &= ~bits;
        if (mask == 0)
            w.Remove(worker);
        else
            w[worker] = mask;
    }

    public List<MatchResult> Match(BlockHash[] chain)
    {
        var workers = chain.Length > 0 && _holders.TryGetValue(chain[0], out var first) ? first.Keys.ToList() : [];
        var results = new List<MatchResult>();
        foreach (int w in workers)
        {
            int matched = 0, gpu = 0, host = 0, ssd = 0;
            while (matched < chain.Length && _holders.TryGetValue(chain[matched], out var hs) && hs.TryGetValue(w, out int mask))
            {
                if ((mask & 1) != 0) gpu++;
                else if ((mask & 2) != 0) host++;
                else ssd++;
                matched++;
            }
            results.Add(new MatchResult(w, matched, gpu, host, ssd));
        }
        return [.. results.OrderByDescending(r => r.Matched).ThenBy(r => r.WorkerId)];
    }

    // What a faithful dump holds: held (block, worker, tier) whose ancestors are all held by someone.
    public HashSet<(BlockHash, int, TierKind)> DumpSet(int? only = null)
    {
        var set = new HashSet<(BlockHash, int, TierKind)>();
        foreach (var (h, w) in _holders)
        {
            bool reachable = true;
            for (BlockHash? cur = _parent[h]; cur is { } c; cur = _parent[c])
                reachable &= IsHeld(c);
            if (!reachable)
                continue;
            foreach (var (worker, mask) in w)
            {
                if (only is { } o && o != worker)
                    continue;
                for (int t = 0; t < 3; t++)
                {
                    if ((mask & (1 << t)) != 0)
                        set.Add((h, worker, (TierKind)t));
                }
            }
        }
        return set;
    }

    public static HashSet<(BlockHash, int, TierKind)> Flatten(IEnumerable<StoredRun> runs)
    {
        var set = new HashSet<(BlockHash, int, TierKind)>();
        foreach (var run in runs)
        {
            foreach (var h in run.Hashes)
                Assert.True(set.Add((h, run.Worker, run.Tier)), $"dump lists block {h} for worker {run.Worker} tier {run.Tier} twice");
        }
        return set;
    }
}
