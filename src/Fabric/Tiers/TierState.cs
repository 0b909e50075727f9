namespace KvFabric.Tiers;

// One tier's bookkeeping inside the tier manager. Guarded by the manager's metadata lock; handles are dense and reused
// so the policy can keep its state in arrays.
internal sealed class TierState
{
    private int[] _freeHandles = new int[64];
    private int _freeCount;
    private int _nextHandle;

    public TierState(int index, TierOptions options, long capacity, int fixedBlockBytes, double latency, double bandwidth)
    {
        Index = index;
        Kind = options.Store.Kind;
        Store = options.Store;
        Policy = options.Policy;
        Admission = options.Admission;
        Capacity = capacity;
        FixedBlockBytes = fixedBlockBytes;
        LatencySeconds = latency;
        SecondsPerByte = 1.0 / bandwidth;
    }

    public int Index { get; }
    public TierKind Kind { get; }
    public IBlockStore Store { get; }
    public IEvictionPolicy Policy { get; }
    public ITierAdmissionFilter? Admission { get; }
    public long Capacity { get; }
    public int FixedBlockBytes { get; }

    public long Used;
    public long Reserved;
    public long EvictableBytes;
    public int Count;
    public int[] BlockOf = new int[64];
    public bool[] Evictable = new bool[64];

    public long Hits, Evictions, DemotionsIn, PromotionsIn, BytesMovedIn, BytesIn, BytesOut, AdmissionRefusals, StoreErrors;
    public double LatencySeconds;
    public double SecondsPerByte;

    public long Free => Capacity - Used - Reserved;

    public int AllocateHandle(int block)
    {
        int h;
        if (_freeCount > 0)
        {
            h = _freeHandles[--_freeCount];
        }
        else
        {
            h = _nextHandle++;
            if (h == BlockOf.Length)
            {
                Array.Resize(ref BlockOf, h * 2);
                Array.Resize(ref Evictable, h * 2);
            }
        }
        BlockOf[h] = block;
        Evictable[h] = false;
        return h;
    }

    public void FreeHandle(int handle)
    {
        BlockOf[handle] = -1;
        if (_freeCount == _freeHandles.Length)
            Array.Resize(ref _freeHandles, _freeCount * 2);
        _freeHandles[_freeCount++] = handle;
    }

    // Reads refine the bandwidth estimate: a read of B bytes that took e seconds, less the configured per-read latency L,
    // gives a sample of (e - L) / B seconds per byte. Reads faster than L carry no bandwidth information.
    public void RecordRead(int bytes, double elapsedSeconds, double smoothing)
    {
        double transfer = elapsedSeconds - LatencySeconds;
        if (bytes <= 0 || transfer <= 0)
            return;
        SecondsPerByte += smoothing * (transfer / bytes - SecondsPerByte);
    }
}
