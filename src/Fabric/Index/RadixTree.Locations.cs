namespace KvFabric.Index;

// Locations beyond an entry's six inline ones live in one contiguous vector in a pool, size-classed: class c spans 4 << c
// uints, a header (count << 8 | class) and (4 << c) - 1 packed locations. Most blocks have one to three holders and
// never touch the pool; a system prompt held by a thousand workers is one 4 KiB vector that
// Match streams instead of chasing a thousand pointers. A full vector moves to the next class; freed vectors go on
// per-class free lists.
public sealed partial class RadixTree
{
    private const int MaxClass = 24;

    private uint[] _pool;
    private uint _poolUsed = 4;                       // uints handed out; offset 0 means "no vector"
    private readonly uint[] _freeVectors = new uint[MaxClass + 1];

    public long OverflowVectors { get; private set; }

    private static int VectorCount(uint header) => (int)(header >> 8);

    private static int VectorCapacity(uint header) => (4 << (int)(header & 0xFF)) - 1;

    private void AddLocation(ref Entry e, uint w1, uint bit)
    {
        int hole = -1;
        for (int k = 0; k < InlineLocations; k++)
        {
            uint loc = e.Loc[k];
            if (loc == 0)
            {
                if (hole < 0)
                    hole = k;
            }
            else if (loc >> 3 == w1)
            {
                if ((loc & bit) != 0)
                    StoredAlreadyHeld++;
                e.Loc[k] = loc | bit;
                return;
            }
        }
        uint v = e.Overflow;
        int count = 0;
        if (v != 0)
        {
            count = VectorCount(_pool[v]);
            for (int k = 1; k <= count; k++)
            {
                uint loc = _pool[v + k];
                if (loc >> 3 == w1)
                {
                    if ((loc & bit) != 0)
                        StoredAlreadyHeld++;
                    _pool[v + k] = loc | bit;
                    return;
                }
            }
        }
        uint packed = w1 << 3 | bit;
        if (hole >= 0)
        {
            e.Loc[hole] = packed;
        }
        else
        {
            if (v == 0)
                e.Overflow = v = NewVector(0);
            else if (count == VectorCapacity(_pool[v]))
                e.Overflow = v = GrowVector(v);
            _pool[v + 1 + count] = packed;
            _pool[v] += 1u << 8;
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
        for (int k = 0; k < InlineLocations; k++)
        {
            uint loc = e.Loc[k];
            if (loc >> 3 != w1)
                continue;
            if ((loc & bits) == 0)
                return false;
            loc &= ~bits;
            e.Loc[k] = (loc & 7) != 0 ? loc : 0;
            if (e.Loc[k] == 0)
                DroppedLocation(w1);
            return true;
        }
        uint v = e.Overflow;
        if (v == 0)
            return false;
        int count = VectorCount(_pool[v]);
        for (int k = 1; k <= count; k++)
        {
            uint loc = _pool[v + k];
            if (loc >> 3 != w1)
                continue;
            if ((loc & bits) == 0)
                return false;
            loc &= ~bits;
            if ((loc & 7) != 0)
            {
                _pool[v + k] = loc;
                return true;
            }
            // Keep the vector dense: the last location takes this one's place.
            _pool[v + k] = _pool[v + count];
            _pool[v + count] = 0;
            _pool[v] -= 1u << 8;
            DroppedLocation(w1);
            if (count == 1)
            {
                FreeVector(v);
                e.Overflow = 0;
            }
            return true;
        }
        return false;
    }

    private void DroppedLocation(uint w1)
    {
        Locations--;
        _workerLocations[(int)w1 - 1]--;
    }

    private uint NewVector(int cls)
    {
        if (cls > MaxClass)
            throw new InvalidOperationException($"a block has more than {(4 << MaxClass) - 1} holders; worker ids are not being reused as they should");
        OverflowVectors++;
        uint size = 4u << cls;
        uint v = _freeVectors[cls];
        if (v != 0)
        {
            _freeVectors[cls] = _pool[v + 1];
            _pool[v + 1] = 0;
        }
        else
        {
            if (_poolUsed + size > _pool.Length)
            {
                long grown = Math.Max((long)_pool.Length * 2, _poolUsed + size);
                if (grown > Array.MaxLength)
                    throw new InvalidOperationException($"the location pool is full ({_poolUsed} uints); shard the index across tenants or processes");
                Array.Resize(ref _pool, (int)grown);
            }
            v = _poolUsed;
            _poolUsed += size;
        }
        _pool[v] = (uint)cls;
        return v;
    }

    private uint GrowVector(uint v)
    {
        uint header = _pool[v];
        int cls = (int)(header & 0xFF);
        int count = VectorCount(header);
        uint bigger = NewVector(cls + 1);
        Array.Copy(_pool, v + 1, _pool, bigger + 1, count);
        _pool[bigger] = (uint)count << 8 | (uint)(cls + 1);
        FreeVector(v);
        return bigger;
    }

    private void FreeVector(uint v)
    {
        OverflowVectors--;
        int cls = (int)(_pool[v] & 0xFF);
        Array.Clear(_pool, (int)v, 4 << cls);
        _pool[v] = (uint)cls;
        _pool[v + 1] = _freeVectors[cls];
        _freeVectors[cls] = v;
    }
}
