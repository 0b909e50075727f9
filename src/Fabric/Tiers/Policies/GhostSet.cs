namespace KvFabric.Tiers.Policies;

// The keys of the last `capacity` blocks a segment evicted (ARC's ghost lists, Megiddo & Modha, FAST 2003), as 64-bit
// fingerprints: a ring buffer gives the FIFO order, a dictionary the membership and each member's slot, and each slot
// the sequence number it was filled at, so a hit also tells how deep in the set the key was (its ghost age). Fixed
// memory; Add and TryTake allocate nothing once the set has been full.
internal sealed class GhostSet
{
    private readonly ulong[] _ring;
    private readonly Dictionary<ulong, int> _slotOf;
    private readonly long[] _addedAt;
    private long _added;
    private int _next;

    public GhostSet(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        _ring = new ulong[capacity];
        _addedAt = new long[capacity];
        _slotOf = new Dictionary<ulong, int>(capacity);
    }

    public int Count => _slotOf.Count;

    public bool Contains(in BlockKey key) => _slotOf.ContainsKey(Fingerprint(key));

    public void Add(in BlockKey key)
    {
        ulong fp = Fingerprint(key);
        if (_slotOf.ContainsKey(fp))
            return;
        // The oldest slot is reused; its key leaves the set unless it was taken (and maybe added again elsewhere).
        ulong old = _ring[_next];
        if (old != 0 && _slotOf.TryGetValue(old, out int slot) && slot == _next)
            _slotOf.Remove(old);
        _ring[_next] = fp;
        _addedAt[_next] = ++_added;
        _slotOf[fp] = _next;
        _next = (_next + 1) % _ring.Length;
    }

    // True (and forgets the key) when key is in the set.
    public bool TryTake(in BlockKey key) => TryTake(key, out _);

    // As TryTake, and age = how many keys were added after this one (0: it was the newest), i.e. how many more blocks
    // the segment would have had to hold for it to still be resident.
    public bool TryTake(in BlockKey key, out long age)
    {
        age = 0;
        if (!_slotOf.Remove(Fingerprint(key), out int slot))
            return false;
        age = _added - _addedAt[slot];
        return true;
    }

    // 0 marks an empty ring slot, so no key maps to it.
    private static ulong Fingerprint(in BlockKey key) => FrequencySketch.Mix(key) | 1;
}
