namespace KvFabric.Index;

// Locations beyond an entry's first live in a pool of 16-byte nodes: three packed locations and the next node's index.
// Most blocks have one to three holders, so most entries never touch the pool; a system prompt held by a thousand
// workers walks ~330 nodes per block.
public sealed partial class RadixTree
{
    private const int NodeUints = 4;
    private const int NextField = 3;

    private uint[] _pool;
    private uint _poolFree;     // head of the free-node list, 0 = none
    private uint _poolUsed = 1; // nodes ever handed out; node 0 is the "none" index

    public long OverflowNodes { get; private set; }

    private void AddLocation(ref Entry e, uint w1, uint bit)
    {
        if (e.Loc0 >> 3 == w1)
        {
            if ((e.Loc0 & bit) != 0)
                StoredAlreadyHeld++;
            e.Loc0 |= bit;
            return;
        }
        // Look for the worker in the pool, remembering the first hole to reuse.
        uint holeNode = 0;
        int holeField = -1;
        for (uint node = e.Overflow; node != 0; node = _pool[node * NodeUints + NextField])
        {
            int baseIndex = (int)(node * NodeUints);
            for (int f = 0; f < NextField; f++)
            {
                uint v = _pool[baseIndex + f];
                if (v == 0)
                {
                    if (holeField < 0)
                        (holeNode, holeField) = (node, f);
                }
                else if (v >> 3 == w1)
                {
                    if ((v & bit) != 0)
                        StoredAlreadyHeld++;
                    _pool[baseIndex + f] = v | bit;
                    return;
                }
            }
        }
        uint packed = w1 << 3 | bit;
        if (e.Loc0 == 0)
            e.Loc0 = packed;
        else if (holeField >= 0)
            _pool[holeNode * NodeUints + holeField] = packed;
        else
        {
            uint node = NewNode();
            _pool[node * NodeUints] = packed;
            _pool[node * NodeUints + NextField] = e.Overflow;
            e.Overflow = node;
        }
        Locations++;
        int worker = (int)w1 - 1;
        if (worker >= _workerLocations.Length)
            Array.Resize(ref _workerLocations, Math.Max(worker + 1, 2 * _workerLocations.Length));
        _workerLocations[worker]++;
    }

    // Clears `bits` of the worker's location; drops the location once no tier is left. False if it held none of them.
    private bool RemoveLocation(ref Entry e, uint w1, uint bits)
    {
        if (e.Loc0 >> 3 == w1)
        {
            if ((e.Loc0 & bits) == 0)
                return false;
            e.Loc0 &= ~bits;
            if ((e.Loc0 & 7) == 0)
            {
                e.Loc0 = 0;
                DroppedLocation(w1);
            }
            return true;
        }
        uint prev = 0;
        for (uint node = e.Overflow; node != 0; prev = node, node = _pool[node * NodeUints + NextField])
        {
            int baseIndex = (int)(node * NodeUints);
            for (int f = 0; f < NextField; f++)
            {
                uint v = _pool[baseIndex + f];
                if (v >> 3 != w1 || v == 0)
                    continue;
                if ((v & bits) == 0)
                    return false;
                v &= ~bits;
                if ((v & 7) != 0)
                {
                    _pool[baseIndex + f] = v;
                    return true;
                }
                _pool[baseIndex + f] = 0;
                DroppedLocation(w1);
                if (_pool[baseIndex] == 0 && _pool[baseIndex + 1] == 0 && _pool[baseIndex + 2] == 0)
                {
                    uint next = _pool[baseIndex + NextField];
                    if (prev == 0)
                        e.Overflow = next;
                    else
                        _pool[prev * NodeUints + NextField] = next;
                    FreeNode(node);
                }
                return true;
            }
        }
        return false;
    }

    private void DroppedLocation(uint w1)
    {
        Locations--;
        _workerLocations[(int)w1 - 1]--;
    }

    private uint NewNode()
    {
        OverflowNodes++;
        if (_poolFree != 0)
        {
            uint node = _poolFree;
            _poolFree = _pool[node * NodeUints + NextField];
            _pool[node * NodeUints + NextField] = 0;
            return node;
        }
        if ((long)(_poolUsed + 1) * NodeUints > _pool.Length)
        {
            long grown = Math.Min((long)_pool.Length * 2, Array.MaxLength / NodeUints * NodeUints);
            if (grown <= _pool.Length)
                throw new InvalidOperationException($"the location pool is full ({_poolUsed} nodes); shard the index across tenants or processes");
            Array.Resize(ref _pool, (int)grown);
        }
        return _poolUsed++;
    }

    private void FreeNode(uint node)
    {
        OverflowNodes--;
        int baseIndex = (int)(node * NodeUints);
        _pool[baseIndex] = _pool[baseIndex + 1] = _pool[baseIndex + 2] = 0;
        _pool[baseIndex + NextField] = _poolFree;
        _poolFree = node;
    }
}
