namespace KvFabric.Tiers.Policies;

// The keys of the last `capacity` blocks a segment evicted (ARC's ghost lists, Megiddo & Modha, FAST 2003), as 64-bit
// fingerprints: a ring buffer gives the FIFO order, a dictionary the membership and each member's slot. Fixed memory;
// Add and TryTake allocate nothing once the set has been full.
internal sealed class GhostSet
{
    private readonly ulong[] _ring;
    private readonly Dictionary<ulong, int> _slotOf;
    private int _next;

    public GhostSet(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        _ring = new ulong[capacity];
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
        _slotOf[fp] = _next;
        _next = (_next + 1) % _ring.Length;
    }

    // True (and forgets the key) when key is in the set.
    public bool TryTake(in BlockKey key) => _slotOf.Remove(Fingerprint(key));

    // 0 marks an empty ring slot, so no key maps to it.
    private static ulong Fingerprint(in BlockKey key) => FrequencySketch.Mix(key) | 1;
}
