using KvFabric.Tiers;

namespace KvFabric.Bench.Tiers;

// Bench stand-in for a store: accepts every write and keeps no bytes, so a run measures the tier manager's metadata
// path alone. Never read from (the bench does not call GetAsync).
internal sealed class NullBlockStore(TierKind kind, long capacityBytes) : IBlockStore
{
    public TierKind Kind => kind;
    public long CapacityBytes => capacityBytes;
    public long UsedBytes => 0;
    public int Count => 0;
    public bool Contains(BlockKey key) => false;
    public ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default) => ValueTask.FromResult(true);
    public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default) => ValueTask.FromResult(false);
    public bool Remove(BlockKey key) => true;
    public void Dispose() { }
}

// Bench stand-in for an eviction policy until the policies of src/Fabric/Tiers/Policies are merged: exact LRU over
// evictable handles as an intrusive doubly linked list in arrays (O(1) per call, no allocation after growth).
internal sealed class ArrayLruPolicy : IEvictionPolicy
{
    private int[] _prev = new int[1024], _next = new int[1024];
    private bool[] _linked = new bool[1024];
    private int _head = -1, _tail = -1; // head: least recently used

    public string Name => "bench-array-lru";
    public bool ShouldAdmit(in PolicyBlockInfo info) => true;

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        if (handle >= _linked.Length)
        {
            int size = Math.Max(handle + 1, _linked.Length * 2);
            Array.Resize(ref _prev, size);
            Array.Resize(ref _next, size);
            Array.Resize(ref _linked, size);
        }
        _linked[handle] = false;
    }

    public void OnAccess(int handle)
    {
        if (_linked[handle])
        {
            Unlink(handle);
            Append(handle);
        }
    }

    public void OnRemove(int handle)
    {
        if (_linked[handle])
            Unlink(handle);
    }

    public void SetEvictable(int handle, bool evictable)
    {
        if (evictable && !_linked[handle])
            Append(handle);
        else if (!evictable && _linked[handle])
            Unlink(handle);
    }

    public bool TryPickVictim(out int handle)
    {
        handle = _head;
        return handle >= 0;
    }

    private void Append(int h)
    {
        _prev[h] = _tail;
        _next[h] = -1;
        if (_tail >= 0)
            _next[_tail] = h;
        else
            _head = h;
        _tail = h;
        _linked[h] = true;
    }

    private void Unlink(int h)
    {
        int p = _prev[h], n = _next[h];
        if (p >= 0)
            _next[p] = n;
        else
            _head = n;
        if (n >= 0)
            _prev[n] = p;
        else
            _tail = p;
        _linked[h] = false;
    }
}
