using System.Numerics;
using KvFabric.Blocks;

namespace KvFabric.Tiers;

// The block table: one dense id per cached block, per-block fields in parallel arrays (no per-block objects), children as
// an intrusive doubly linked list, and per tier the block's handle there plus how many of its children have their
// fastest copy in that tier. Everything here runs under _lock.
//
// Leaf-first rests on one invariant kept by every move: a block's fastest tier is never faster than its parent's
// fastest tier. Given that, a descendant held in tier t or faster implies a child whose fastest copy is in tier t or
// faster, so "no child's fastest tier is at or above t" (O(tiers) from the counts) is exactly "no descendant is held in
// the same or a faster tier".
public sealed partial class TierManager
{
    private const int None = -1;

    private Dictionary<BlockKey, int> _index = null!;
    private BlockKey[] _key = null!;
    private int[] _parent = null!, _depth = null!, _length = null!, _pins = null!, _inUse = null!;
    private int[] _firstChild = null!, _nextSibling = null!, _prevSibling = null!;
    private long[] _leaseUntil = null!;
    private byte[] _held = null!, _moving = null!;
    private int[][] _handle = null!, _kids = null!;
    private int[] _freeBlocks = null!;
    private int _freeBlockCount, _nextBlock;
    private bool _muted;
    private readonly PriorityQueue<int, long> _leases = new();
    // Store removals the mover owes once it leaves the lock (FlushRemovals); only the mover adds to it.
    private readonly List<(BlockKey Key, TierState Tier)> _removals = [];

    private void InitBlockTable(int capacity)
    {
        _index = new Dictionary<BlockKey, int>(capacity, BlockKeyComparer.Instance);
        _key = new BlockKey[capacity];
        _parent = new int[capacity];
        _depth = new int[capacity];
        _length = new int[capacity];
        _pins = new int[capacity];
        _inUse = new int[capacity];
        _firstChild = new int[capacity];
        _nextSibling = new int[capacity];
        _prevSibling = new int[capacity];
        _leaseUntil = new long[capacity];
        _held = new byte[capacity];
        _moving = new byte[capacity];
        _handle = new int[_n][];
        _kids = new int[_n][];
        for (int t = 0; t < _n; t++)
        {
            _handle[t] = new int[capacity];
            _kids[t] = new int[capacity];
        }
        _freeBlocks = new int[capacity];
    }

    private void GrowBlockTable()
    {
        int size = _key.Length * 2;
        Array.Resize(ref _key, size);
        Array.Resize(ref _parent, size);
        Array.Resize(ref _depth, size);
        Array.Resize(ref _length, size);
        Array.Resize(ref _pins, size);
        Array.Resize(ref _inUse, size);
        Array.Resize(ref _firstChild, size);
        Array.Resize(ref _nextSibling, size);
        Array.Resize(ref _prevSibling, size);
        Array.Resize(ref _leaseUntil, size);
        Array.Resize(ref _held, size);
        Array.Resize(ref _moving, size);
        for (int t = 0; t < _n; t++)
        {
            Array.Resize(ref _handle[t], size);
            Array.Resize(ref _kids[t], size);
        }
        Array.Resize(ref _freeBlocks, size);
    }

    private int NewBlock(BlockKey key, int parent, int depth, int length)
    {
        int b;
        if (_freeBlockCount > 0)
        {
            b = _freeBlocks[--_freeBlockCount];
        }
        else
        {
            if (_nextBlock == _key.Length)
                GrowBlockTable();
            b = _nextBlock++;
        }
        _key[b] = key;
        _parent[b] = parent;
        _depth[b] = depth;
        _length[b] = length;
        _pins[b] = 0;
        _inUse[b] = 0;
        _leaseUntil[b] = 0;
        _held[b] = 0;
        _moving[b] = 0;
        _firstChild[b] = None;
        _prevSibling[b] = None;
        _nextSibling[b] = None;
        for (int t = 0; t < _n; t++)
        {
            _handle[t][b] = None;
            _kids[t][b] = 0;
        }
        if (parent != None)
        {
            int first = _firstChild[parent];
            _nextSibling[b] = first;
            if (first != None)
                _prevSibling[first] = b;
            _firstChild[parent] = b;
        }
        _index.Add(key, b);
        return b;
    }

    // Frees the entry of a block that is held nowhere, and then any ancestor left held nowhere and childless (a block
    // can outlive its bytes only while a child of it is still cached, after a corruption drop).
    private void FreeBlockIfUnused(int b)
    {
        while (b != None && _length[b] != 0 && _held[b] == 0 && _firstChild[b] == None && _inUse[b] == 0)
        {
            int parent = _parent[b];
            if (parent != None)
            {
                int prev = _prevSibling[b], next = _nextSibling[b];
                if (prev != None)
                    _nextSibling[prev] = next;
                else
                    _firstChild[parent] = next;
                if (next != None)
                    _prevSibling[next] = prev;
            }
            _index.Remove(_key[b]);
            _parent[b] = None;
            _length[b] = 0; // marks the entry free
            _freeBlocks[_freeBlockCount++] = b;
            b = parent;
        }
    }

    // The block with this key whose parent is `parent` (None: any block, the start of the segment asked about), or None. Walking a chain, the next
    // block is almost always one of few children of the previous one: comparing keys there is cheaper than hashing into
    // the index, which remains the path for first blocks and for parents with many children.
    private int FindInChain(BlockKey key, int parent)
    {
        if (parent != None)
        {
            int scanned = 0;
            for (int c = _firstChild[parent]; c != None; c = _nextSibling[c])
            {
                if (BlockKeyComparer.Instance.Equals(_key[c], key))
                    return c;
                if (++scanned == 8)
                    break;
            }
            if (scanned < 8)
                return None;
        }
        if (!_index.TryGetValue(key, out int b) || (parent != None && _parent[b] != parent))
            return None;
        return b;
    }

    private int Fastest(int b) => _held[b] == 0 ? None : BitOperations.TrailingZeroCount(_held[b]);

    private bool Holds(int b, int t) => (_held[b] & (1 << t)) != 0;

    private bool IsPinned(int b) => _pins[b] > 0 && _leaseUntil[b] > _now;

    private PolicyBlockInfo InfoOf(int b) => new(_key[b], _depth[b], _length[b]);

    private BlockMeta MetaOf(int b) => new(_parent[b] == None ? default : _key[_parent[b]].Hash, _depth[b], _length[b]);

    private void AddResidency(int b, int t)
    {
        var tier = _tiers[t];
        int oldFastest = Fastest(b);
        int h = tier.AllocateHandle(b);
        _handle[t][b] = h;
        _held[b] |= (byte)(1 << t);
        tier.Used += _length[b];
        tier.Count++;
        tier.BytesIn += _length[b];
        tier.Policy.OnAdmit(h, InfoOf(b));
        Publish(KvEventKind.Stored, b, t);
        FastestChanged(b, oldFastest);
        RefreshEvictable(b);
    }

    // Removes the block from tier t's metadata (the caller removes the bytes from the store, outside the lock).
    private void RemoveResidency(int b, int t)
    {
        var tier = _tiers[t];
        int oldFastest = Fastest(b);
        int h = _handle[t][b];
        if (tier.Evictable[h])
        {
            tier.Evictable[h] = false;
            tier.EvictableBytes -= _length[b];
        }
        tier.Policy.OnRemove(h);
        tier.FreeHandle(h);
        _handle[t][b] = None;
        _held[b] &= (byte)~(1 << t);
        _moving[b] &= (byte)~(1 << t);
        tier.Used -= _length[b];
        tier.Count--;
        tier.BytesOut += _length[b];
        Publish(KvEventKind.Removed, b, t);
        FastestChanged(b, oldFastest);
    }

    private void FastestChanged(int b, int oldFastest)
    {
        int parent = _parent[b], newFastest = Fastest(b);
        if (parent == None || oldFastest == newFastest)
            return;
        if (oldFastest != None)
            _kids[oldFastest][parent]--;
        if (newFastest != None)
            _kids[newFastest][parent]++;
        RefreshEvictable(parent);
    }

    private bool ChildAtOrAbove(int b, int t)
    {
        for (int s = 0; s <= t; s++)
        {
            if (_kids[s][b] != 0)
                return true;
        }
        return false;
    }

    // The fastest tier holding a child's fastest copy; _n when no child is cached.
    private int FastestChildTier(int b)
    {
        for (int s = 0; s < _n; s++)
        {
            if (_kids[s][b] != 0)
                return s;
        }
        return _n;
    }

    // Tells each policy whether the block may be picked as a victim in its tier now.
    private void RefreshEvictable(int b)
    {
        int held = _held[b];
        if (held == 0)
            return;
        bool free = _inUse[b] == 0 && !IsPinned(b);
        for (int t = 0; t < _n; t++)
        {
            if ((held & (1 << t)) == 0)
                continue;
            bool want = free && (_moving[b] & (1 << t)) == 0 && !ChildAtOrAbove(b, t);
            var tier = _tiers[t];
            int h = _handle[t][b];
            if (tier.Evictable[h] == want)
                continue;
            tier.Evictable[h] = want;
            tier.EvictableBytes += want ? _length[b] : -_length[b];
            tier.Policy.SetEvictable(h, want);
        }
    }

    private void AddUse(int b)
    {
        if (_inUse[b]++ == 0)
            RefreshEvictable(b);
    }

    private void DropUse(int b)
    {
        if (--_inUse[b] == 0)
        {
            RefreshEvictable(b);
            FreeBlockIfUnused(b);
        }
    }

    // Leases that lapsed make their blocks evictable again; stale queue entries (a lease extended since) are skipped.
    private void ExpireLeases()
    {
        while (_leases.TryPeek(out int b, out long until) && until <= _now)
        {
            _leases.Dequeue();
            if (_leaseUntil[b] == until)
            {
                _pins[b] = 0;
                _leaseUntil[b] = 0;
                RefreshEvictable(b);
            }
        }
    }

    private void Publish(KvEventKind kind, int b, int t)
    {
        if (_muted)
            return;
        ++_sequence;
        _events?.OnEvent(MakeEvent(_sequence, kind, b, t));
    }

    private KvEvent MakeEvent(ulong sequence, KvEventKind kind, int b, int t)
    {
        var key = _key[b];
        BlockHash parent = _parent[b] == None ? default : _key[_parent[b]].Hash;
        return new KvEvent(sequence, kind, key.Tenant, _tiers[t].Kind, key.Hash, parent, _depth[b]);
    }
}
