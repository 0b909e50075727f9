namespace KvFabric.Tiers.Replay;

// One tier of a simulated hierarchy: its kind, how many blocks it holds, and its eviction policy.
public sealed record SimulatedTier(TierKind Kind, int CapacityBlocks, IEvictionPolicy Policy);

// A block-count simulation of the tier hierarchy that drives real IEvictionPolicy instances exactly as the tier
// manager does (dense handles per tier, evictability for leaf-first and pins, admission before entering a full tier).
// The rules it keeps, which the tests check after every step:
//
//  * Prefix-closed and leaf-first: a block is resident only if its parent is, in the same or a faster tier; so a
//    block is evictable only when no child of it is resident in its tier or a faster one, and not pinned.
//  * A request's blocks are pinned while its Put runs (the worker is using them), so making room for block i never
//    evicts blocks 0..i-1 of the same request.
//  * A new block goes to the fastest tier at or below its parent's tier that takes it: a tier with room, or a full
//    tier whose policy admits it and has a victim. A block no tier takes is not stored, and neither is the rest of its
//    chain (unreachable by any prefix lookup); the rest of the chain is still offered to that tier's ShouldAdmit, so
//    the policy's history sees it.
//  * A hit in a slower tier is promoted to its parent's tier (the fastest allowed) when that tier takes it.
//  * Every use of a block (each block a put names, the unstorable rest of a chain included) is reported to every tier's
//    policy (IEvictionPolicy.OnSighting) before the block is acted on; moves between tiers are not uses.
//  * A victim is demoted to the next tier down, which takes it without asking its policy, except the last tier: its
//    policy may refuse a demoted block (an SSD admission filter), which is then dropped, unless the block has resident
//    children (they are in slower tiers and need their parent).
public sealed class PolicySimulatorCache : IReplayCache
{
    private const int Absent = -1;

    private readonly SimulatedTier[] _tiers;
    private readonly TierKind[] _kinds;
    private readonly int _tierCount;
    private readonly int _blockBytes;
    private readonly int[][] _nodeOfHandle;
    private readonly int[][] _freeHandles;
    private readonly int[] _freeCount;
    private readonly int[] _used;
    private readonly Dictionary<BlockKey, int> _nodes = [];
    private readonly List<int> _pinnedNow = [];

    // Per node (a block ever seen): its key, parent node (-1 for a chain's first block), depth, tier (-1 when absent),
    // handle in that tier, children resident per tier, pin and the evictability last told to the policy.
    private BlockKey[] _key = new BlockKey[1024];
    private int[] _parent = new int[1024];
    private int[] _depth = new int[1024];
    private int[] _tier = new int[1024];
    private int[] _handle = new int[1024];
    private int[] _childrenIn = [];
    private bool[] _pinned = new bool[1024];
    private bool[] _evictable = new bool[1024];
    private int _nodeCount;

    public PolicySimulatorCache(IReadOnlyList<SimulatedTier> tiers, int blockBytes, string? name = null)
    {
        ArgumentNullException.ThrowIfNull(tiers);
        if (tiers.Count is < 1 or > 3)
            throw new ArgumentException("A hierarchy has one to three tiers.", nameof(tiers));
        ArgumentOutOfRangeException.ThrowIfLessThan(blockBytes, 1);
        _tiers = [.. tiers];
        _tierCount = _tiers.Length;
        _kinds = [.. _tiers.Select(t => t.Kind)];
        for (int t = 0; t < _tierCount; t++)
        {
            ArgumentOutOfRangeException.ThrowIfLessThan(_tiers[t].CapacityBlocks, 1);
            if (t > 0 && _kinds[t] <= _kinds[t - 1])
                throw new ArgumentException("Tiers must be listed fastest first, each kind once.", nameof(tiers));
        }
        _blockBytes = blockBytes;
        _nodeOfHandle = new int[_tierCount][];
        _freeHandles = new int[_tierCount][];
        _freeCount = new int[_tierCount];
        _used = new int[_tierCount];
        for (int t = 0; t < _tierCount; t++)
        {
            int cap = _tiers[t].CapacityBlocks;
            _nodeOfHandle[t] = new int[cap];
            _freeHandles[t] = new int[cap];
            // Handles are handed out lowest first and reused most recently freed first, like a tier manager's slab.
            for (int h = 0; h < cap; h++)
                _freeHandles[t][h] = cap - 1 - h;
            _freeCount[t] = cap;
        }
        _childrenIn = new int[1024 * _tierCount];
        Name = name ?? string.Join(",", _tiers.Select(t => t.Policy.Name));
        Stats = new ReplayCacheStats(_tierCount);
    }

    public string Name { get; }

    public IReadOnlyList<TierKind> Tiers => _kinds;

    public ReplayCacheStats Stats { get; }

    public int BlockBytes => _blockBytes;

    public int ResidentBlocks(int tier) => _used[tier];

    // The handle of key in its tier, or -1.
    public int HandleOf(BlockKey key) => _nodes.TryGetValue(key, out int n) && _tier[n] != Absent ? _handle[n] : Absent;

    // The tier index holding key, or -1.
    public int TierOf(BlockKey key) => _nodes.TryGetValue(key, out int n) ? _tier[n] : Absent;

    public int LookupPrefix(ReadOnlySpan<BlockKey> chain, Span<TierKind> tierOf)
    {
        for (int i = 0; i < chain.Length; i++)
        {
            if (!_nodes.TryGetValue(chain[i], out int n) || _tier[n] == Absent)
                return i;
            if (i < tierOf.Length)
                tierOf[i] = _kinds[_tier[n]];
        }
        return chain.Length;
    }

    public void Put(ReadOnlySpan<BlockKey> chain)
    {
        int parent = Absent;
        try
        {
            for (int i = 0; i < chain.Length; i++)
            {
                int n = NodeFor(chain[i], parent, i);
                ReportSighting(n);
                _pinned[n] = true;
                _pinnedNow.Add(n);
                int minTier = parent == Absent ? 0 : _tier[parent];
                if (_tier[n] != Absent)
                {
                    RefreshEvictable(n);
                    if (_tier[n] <= minTier || !TryPromote(n, minTier))
                        _tiers[_tier[n]].Policy.OnAccess(_handle[n]);
                }
                else if (!TryPlaceNew(n, minTier))
                {
                    Stats.BlocksNotStored++;
                    OfferUnstorable(chain, i + 1, minTier);
                    break;
                }
                parent = n;
            }
        }
        finally
        {
            foreach (int n in _pinnedNow)
            {
                _pinned[n] = false;
                RefreshEvictable(n);
            }
            _pinnedNow.Clear();
        }
    }

    // Checks every structural rule against the policies' view; throws on the first broken one. O(blocks ever seen).
    public void CheckInvariants()
    {
        var expected = new int[_nodeCount * _tierCount];
        for (int n = 0; n < _nodeCount; n++)
        {
            int t = _tier[n];
            if (t == Absent)
                continue;
            int p = _parent[n];
            if (p != Absent)
            {
                if (_tier[p] == Absent)
                    throw new InvalidOperationException($"Block {_key[n]} is resident in {_kinds[t]} but its parent {_key[p]} is not.");
                if (_tier[p] > t)
                    throw new InvalidOperationException($"Block {_key[n]} is in {_kinds[t]} but its parent {_key[p]} is in the slower {_kinds[_tier[p]]}.");
                expected[p * _tierCount + t]++;
            }
            if (_nodeOfHandle[t][_handle[n]] != n)
                throw new InvalidOperationException($"Handle {_handle[n]} of {_kinds[t]} does not map back to block {_key[n]}.");
        }
        for (int n = 0; n < _nodeCount; n++)
        {
            for (int t = 0; t < _tierCount; t++)
            {
                if (expected[n * _tierCount + t] != _childrenIn[n * _tierCount + t])
                    throw new InvalidOperationException($"Child count of {_key[n]} in {_kinds[t]} is {_childrenIn[n * _tierCount + t]}, not {expected[n * _tierCount + t]}.");
            }
            if (_evictable[n] != ComputeEvictable(n))
                throw new InvalidOperationException($"Block {_key[n]}: evictability told to the policy is stale.");
        }
        for (int t = 0; t < _tierCount; t++)
        {
            if (_used[t] > _tiers[t].CapacityBlocks || _used[t] + _freeCount[t] != _tiers[t].CapacityBlocks)
                throw new InvalidOperationException($"{_kinds[t]} accounting is off: {_used[t]} used, {_freeCount[t]} free, capacity {_tiers[t].CapacityBlocks}.");
        }
    }

    private int NodeFor(BlockKey key, int parent, int depth)
    {
        if (_nodes.TryGetValue(key, out int n))
        {
            if (_parent[n] != parent || _depth[n] != depth)
                throw new InvalidDataException($"Block {key} appears at depth {depth} after a different parent than before: the chain ids are not chained hashes.");
            return n;
        }
        n = _nodeCount++;
        if (n == _key.Length)
            GrowNodes();
        _key[n] = key;
        _parent[n] = parent;
        _depth[n] = depth;
        _tier[n] = Absent;
        _nodes.Add(key, n);
        return n;
    }

    // The rest of a chain whose block could not be stored cannot be stored either (no parent), but the fastest tier it
    // could have gone to still sees each block offered, so that its policy's history counts the sighting: a history
    // that skipped them would learn a refused chain one block per request. The answers are moot.
    private void OfferUnstorable(ReadOnlySpan<BlockKey> chain, int from, int tier)
    {
        bool full = _used[tier] >= _tiers[tier].CapacityBlocks;
        for (int j = from; j < chain.Length; j++)
        {
            int n = NodeFor(chain[j], j == 0 ? Absent : _nodes[chain[j - 1]], j);
            ReportSighting(n);
            if (full)
                _ = _tiers[tier].Policy.ShouldAdmit(InfoOf(n));
        }
    }

    // Every tier's policy is told of each use of a block, resident there or not (IEvictionPolicy.OnSighting), so that
    // moves between tiers are not counted as uses and a demoted block arrives with its history.
    private void ReportSighting(int n)
    {
        var info = InfoOf(n);
        for (int t = 0; t < _tierCount; t++)
            _tiers[t].Policy.OnSighting(info);
    }

    private PolicyBlockInfo InfoOf(int n) => new(_key[n], _depth[n], _blockBytes);

    private bool TryPlaceNew(int n, int fastest)
    {
        var info = InfoOf(n);
        for (int t = fastest; t < _tierCount; t++)
        {
            if (TryMakeRoom(t, info, mustTake: false))
            {
                Enter(n, t, info);
                return true;
            }
        }
        return false;
    }

    private bool TryPromote(int n, int target)
    {
        var info = InfoOf(n);
        for (int t = target; t < _tier[n]; t++)
        {
            if (TryMakeRoom(t, info, mustTake: false))
            {
                Leave(n);
                Enter(n, t, info);
                Stats.BytesPromotedTo[t] += _blockBytes;
                return true;
            }
        }
        return false;
    }

    // Room for one block in tier t: free space, or a victim evicted if the policy admits the block (not asked when the
    // block must be taken).
    private bool TryMakeRoom(int t, in PolicyBlockInfo info, bool mustTake)
    {
        if (_used[t] < _tiers[t].CapacityBlocks)
            return true;
        var policy = _tiers[t].Policy;
        if (!mustTake && !policy.ShouldAdmit(info))
        {
            Stats.Bypassed[t]++;
            return false;
        }
        if (!policy.TryPickVictim(out int victimHandle))
            return false;
        int victim = _nodeOfHandle[t][victimHandle];
        if (!_evictable[victim])
            throw new InvalidOperationException($"{policy.Name} picked {_key[victim]} in {_kinds[t]}, which is not evictable.");
        Evict(victim);
        return true;
    }

    private void Evict(int v)
    {
        int from = _tier[v];
        var info = InfoOf(v);
        bool hasChildren = false;
        for (int t = 0; t < _tierCount; t++)
            hasChildren |= _childrenIn[v * _tierCount + t] > 0;
        Leave(v);
        for (int t = from + 1; t < _tierCount; t++)
        {
            // Children live in slower tiers only (v was evictable), so the next tier is always allowed. A middle tier
            // takes every demoted block (eviction demotes; only the last tier drops); the last tier's policy may refuse
            // one (e.g. an SSD admission filter) unless it has children there, which would lose their parent.
            if (TryMakeRoom(t, info, mustTake: hasChildren || t < _tierCount - 1))
            {
                Enter(v, t, info);
                Stats.BytesDemotedFrom[from] += _blockBytes;
                return;
            }
            if (hasChildren)
                throw new InvalidOperationException($"{_kinds[t]} has no evictable block to make room for {_key[v]}, whose children it holds: the tier is smaller than what is pinned in it.");
        }
        Stats.BlocksDropped++;
    }

    private void Enter(int n, int t, in PolicyBlockInfo info)
    {
        int h = _freeHandles[t][--_freeCount[t]];
        _used[t]++;
        _nodeOfHandle[t][h] = n;
        _tier[n] = t;
        _handle[n] = h;
        _evictable[n] = false;
        Stats.BlocksWritten[t]++;
        _tiers[t].Policy.OnAdmit(h, info);
        int p = _parent[n];
        if (p != Absent)
        {
            _childrenIn[p * _tierCount + t]++;
            RefreshEvictable(p);
        }
        RefreshEvictable(n);
    }

    private void Leave(int n)
    {
        int t = _tier[n];
        int h = _handle[n];
        _tiers[t].Policy.OnRemove(h);
        _freeHandles[t][_freeCount[t]++] = h;
        _used[t]--;
        _tier[n] = Absent;
        _evictable[n] = false;
        int p = _parent[n];
        if (p != Absent)
        {
            _childrenIn[p * _tierCount + t]--;
            RefreshEvictable(p);
        }
    }

    private bool ComputeEvictable(int n)
    {
        int t = _tier[n];
        if (t == Absent || _pinned[n])
            return false;
        for (int u = 0; u <= t; u++)
        {
            if (_childrenIn[n * _tierCount + u] > 0)
                return false;
        }
        return true;
    }

    private void RefreshEvictable(int n)
    {
        bool e = ComputeEvictable(n);
        if (e == _evictable[n])
            return;
        _evictable[n] = e;
        _tiers[_tier[n]].Policy.SetEvictable(_handle[n], e);
    }

    private void GrowNodes()
    {
        int size = _key.Length * 2;
        Array.Resize(ref _key, size);
        Array.Resize(ref _parent, size);
        Array.Resize(ref _depth, size);
        Array.Resize(ref _tier, size);
        Array.Resize(ref _handle, size);
        Array.Resize(ref _pinned, size);
        Array.Resize(ref _evictable, size);
        Array.Resize(ref _childrenIn, size * _tierCount);
    }
}
