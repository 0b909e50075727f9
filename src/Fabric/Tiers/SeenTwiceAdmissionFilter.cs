namespace KvFabric.Tiers;

// Admits a block to a tier only the second time it is offered within a window (a "doorkeeper", as in TinyLFU): blocks
// used once are not worth an SSD write. A fixed table of small counters indexed by hash bits, so it allocates nothing and
// forgets old sightings: every `window` offers all counters are halved. Collisions can only admit early, never refuse.
public sealed class SeenTwiceAdmissionFilter : ITierAdmissionFilter
{
    private readonly byte[] _seen;
    private readonly int _mask;
    private readonly int _window;
    private int _offers;

    public SeenTwiceAdmissionFilter(int tableSize = 1 << 20, int window = 1 << 22)
    {
        if (tableSize <= 0 || !int.IsPow2(tableSize))
            throw new ArgumentOutOfRangeException(nameof(tableSize), tableSize, "the table size must be a positive power of two");
        if (window <= 0)
            throw new ArgumentOutOfRangeException(nameof(window), window, "the aging window must be a positive number of offers");
        _seen = new byte[tableSize];
        _mask = tableSize - 1;
        _window = window;
    }

    // Called under the tier manager's lock.
    public bool Admit(in PolicyBlockInfo info)
    {
        if (++_offers >= _window)
        {
            _offers = 0;
            for (int i = 0; i < _seen.Length; i++)
                _seen[i] >>= 1;
        }
        int slot = (int)((info.Key.Hash.Lo ^ info.Key.Tenant) & (uint)_mask);
        if (_seen[slot] >= 1)
            return true;
        _seen[slot] = 1;
        return false;
    }
}
