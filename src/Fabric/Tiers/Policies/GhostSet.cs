namespace KvFabric.Tiers.Policies;

// The keys of the last `capacity` blocks a segment evicted (ARC's ghost lists, Megiddo & Modha, FAST 2003), as 64-bit
// fingerprints: a ring buffer gives the FIFO order and a hash set the membership. Fixed memory; Add and TryTake
// allocate nothing once the set has been full.
internal sealed class GhostSet
{
    private readonly ulong[] _ring;
    private readonly HashSet<ulong> _members;
    private int _next;

    public GhostSet(int capacity)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, 1);
        _ring = new ulong[capacity];
        _members = new HashSet<ulong>(capacity);
    }

    public int Count => _members.Count;

    public void Add(in BlockKey key)
    {
        ulong fp = Fingerprint(key);
        if (!_members.Add(fp))
            return;
        ulong old = _ring[_next];
        if (old != 0)
            _members.Remove(old);
        _ring[_next] = fp;
        _next = (_next + 1) % _ring.Length;
    }

    // True (and forgets the key) when key is in the set. Its ring slot stays until overwritten; a stale slot only
    // removes a fingerprint that is no longer there.
    public bool TryTake(in BlockKey key) => _members.Remove(Fingerprint(key));

    // 0 marks an empty ring slot, so no key maps to it.
    private static ulong Fingerprint(in BlockKey key) => FrequencySketch.Mix(key) | 1;
}
