using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KvFabric.Blocks;
using KvFabric.Memory;
using KvFabric.Tiers;

namespace KvFabric.Index;

// The global prefix index of one tenant. Block hashes are chained (each commits to its whole prefix), so the radix tree is
// a hash table keyed by the 16-byte hash with a parent link per entry: no edge lists, no string compares.
// Single-threaded: RadixIndex serialises writers and lets readers in only between write batches. Match may run on
// several threads at once (it only reads; its scratch is per thread). docs/index.md has the layout and the costs.
public sealed unsafe partial class RadixTree : IDisposable
{
    // One table slot: 64 bytes, one cache line (the table is page-aligned), so a probe that hits costs one miss and most
    // blocks (up to six holders) need nothing outside it.
    [StructLayout(LayoutKind.Sequential)]
    private struct Entry
    {
        public ulong Hi;       // Hi = Lo = 0: an empty slot (ApplyStored refuses the all-zero hash)
        public ulong Lo;
        public Inline Loc;     // locations: (worker + 1) << 3 | tier mask; 0 = none
        public uint Overflow;  // offset of the vector of further locations in the pool; 0 = none
        public uint Children;  // entries whose parent is this one: keeps a holderless entry alive for its subtree
        public ulong ParentHi; // ParentHi = ParentLo = 0: a root block
        public ulong ParentLo;

        public readonly bool IsEmpty => (Hi | Lo) == 0;

        public readonly bool IsRoot => (ParentHi | ParentLo) == 0;

        public readonly bool IsHeld => (Loc[0] | Loc[1] | Loc[2] | Loc[3] | Loc[4] | Loc[5] | Overflow) != 0;
    }

    private const int InlineLocations = 6;

    [InlineArray(InlineLocations)]
    private struct Inline
    {
        private uint _first;
    }

    public const int MaxWorkerId = (1 << 28) - 2;
    private const ulong Fibonacci = 0x9E3779B97F4A7C15UL;
    private const int MinBits = 10;

    private AnonymousMemory _memory;
    private Entry* _table;
    private int _bits;
    private long _mask;
    private long _count;
    private long[] _slots = new long[64];        // ApplyStored's per-event scratch (writer only)
    private long[] _workerLocations = new long[16]; // (block, worker) pairs per worker: lets ClearWorker skip idle workers
    private int _workerLimit;                      // 1 + the largest worker id ever stored: Match sizes its scratch by it

    public RadixTree(long initialBlocks = 1024)
    {
        if (initialBlocks < 0)
            throw new ArgumentOutOfRangeException(nameof(initialBlocks), initialBlocks, "the initial block count cannot be negative");
        int bits = MinBits;
        while (bits < 40 && (1L << bits) * 3 / 4 < initialBlocks)
            bits++;
        _memory = Allocate(bits);
        _table = (Entry*)_memory.Address;
        SetBits(bits);
        _pool = new uint[4 * 256];
    }

    public long Blocks => _count;
    public long Locations { get; private set; }
    public long Capacity => _mask + 1;
    public long BytesAllocated => (_mask + 1) * sizeof(Entry) + OverflowPoolBytes;
    public long OverflowPoolBytes => (long)_pool.Length * sizeof(uint);
    public long RejectedUnknownParent { get; private set; }
    public long RejectedParentMismatch { get; private set; }
    public long RejectedZeroHash { get; private set; }
    public long RemovedNotHeld { get; private set; }
    public long StoredAlreadyHeld { get; private set; }
    public static int EntryBytes => sizeof(Entry);

    public void Dispose()
    {
        _memory.Dispose();
        _table = null;
    }

    public ApplyStatus ApplyStored(int worker, BlockHash? parent, ReadOnlySpan<BlockHash> hashes, TierKind tier)
    {
        CheckWorker(worker);
        if ((byte)tier > (byte)TierKind.Ssd)
            return ApplyStatus.BadTier;
        if (hashes.IsEmpty)
            return ApplyStatus.Applied;
        EnsureRoom(hashes.Length);

        // Validate before touching anything, so a rejected event changes nothing. The walk records each block's slot
        // (found, or the first free slot of its probe run) so that applying does not probe from the start again.
        long parentSlot = -1;
        if (parent is { } p)
        {
            parentSlot = (p.Hi | p.Lo) == 0 ? -1 : Find(p.Hi, p.Lo);
            if (parentSlot < 0)
            {
                RejectedUnknownParent++;
                return ApplyStatus.UnknownParent;
            }
        }
        if (_slots.Length < hashes.Length)
            _slots = new long[Math.Max(hashes.Length, 2 * _slots.Length)];
        int known = 0; // hashes[..known] exist; in a well-formed chain nothing after the first new block can exist
        bool inKnownPrefix = true;
        for (int i = 0; i < hashes.Length; i++)
        {
            var h = hashes[i];
            if ((h.Hi | h.Lo) == 0)
            {
                RejectedZeroHash++;
                return ApplyStatus.ZeroHash;
            }
            long slot = Probe(h.Hi, h.Lo, out bool found);
            _slots[i] = slot;
            if (!found)
            {
                inKnownPrefix = false;
                continue;
            }
            ref Entry e = ref _table[slot];
            bool parentOk = i == 0
                ? (parent is { } q ? e.ParentHi == q.Hi && e.ParentLo == q.Lo : e.IsRoot)
                : e.ParentHi == hashes[i - 1].Hi && e.ParentLo == hashes[i - 1].Lo;
            if (!parentOk || !inKnownPrefix)
            {
                RejectedParentMismatch++;
                return ApplyStatus.ParentMismatch;
            }
            known = i + 1;
        }

        uint w1 = (uint)worker + 1;
        uint bit = 1u << (int)tier;
        long prev = parentSlot;
        for (int i = 0; i < hashes.Length; i++)
        {
            long slot = _slots[i];
            if (i >= known)
            {
                // New block: the recorded slot was free at validation; blocks inserted since may have taken it.
                var h = hashes[i];
                while (!_table[slot].IsEmpty && !(_table[slot].Hi == h.Hi && _table[slot].Lo == h.Lo))
                    slot = (slot + 1) & _mask;
                if (_table[slot].IsEmpty)
                {
                    ref Entry n = ref _table[slot];
                    n.Hi = h.Hi;
                    n.Lo = h.Lo;
                    if (prev >= 0)
                    {
                        ref Entry pe = ref _table[prev];
                        n.ParentHi = pe.Hi;
                        n.ParentLo = pe.Lo;
                        pe.Children++;
                    }
                    _count++;
                }
            }
            AddLocation(ref _table[slot], w1, bit);
            prev = slot;
        }
        if (worker >= _workerLimit)
            _workerLimit = worker + 1;
        return ApplyStatus.Applied;
    }

    // Removes `tier` of `worker` from each block; the hashes need not form a chain. Returns how many were held.
    public int ApplyRemoved(int worker, ReadOnlySpan<BlockHash> hashes, TierKind tier)
    {
        CheckWorker(worker);
        if ((byte)tier > (byte)TierKind.Ssd)
            return 0;
        uint w1 = (uint)worker + 1;
        uint bit = 1u << (int)tier;
        int removed = 0;
        foreach (var h in hashes)
        {
            long slot = Find(h.Hi, h.Lo);
            if (slot < 0 || !RemoveLocation(ref _table[slot], w1, bit))
            {
                RemovedNotHeld++;
                continue;
            }
            removed++;
            FreeIfDead(slot);
        }
        return removed;
    }

    // Drops the worker's blocks in one tier (or all tiers for null); a node that left or sent Cleared. Scans the table,
    // so it costs O(capacity) unless the worker holds nothing. Returns the locations or tier bits removed.
    public long ClearWorker(int worker, TierKind? tier)
    {
        CheckWorker(worker);
        if (worker >= _workerLocations.Length || _workerLocations[worker] == 0)
            return 0;
        uint w1 = (uint)worker + 1;
        uint bits = tier is { } t ? 1u << (int)t : 7u;
        long removed = 0;
        var dead = new List<BlockHash>();
        long capacity = _mask + 1;
        for (long s = 0; s < capacity; s++)
        {
            ref Entry e = ref _table[s];
            if (e.IsEmpty || !RemoveLocation(ref e, w1, bits))
                continue;
            removed++;
            if (!e.IsHeld && e.Children == 0)
                dead.Add(new BlockHash(e.Hi, e.Lo));
        }
        // Freeing moves entries (backward-shift deletion), so free by hash after the scan, not during it.
        foreach (var h in dead)
        {
            long slot = Find(h.Hi, h.Lo);
            if (slot >= 0)
                FreeIfDead(slot);
        }
        return removed;
    }

    public bool Contains(BlockHash hash) => Find(hash.Hi, hash.Lo) >= 0;

    private static void CheckWorker(int worker)
    {
        if ((uint)worker > MaxWorkerId)
            ThrowWorker(worker);
    }

    private static void ThrowWorker(int worker) =>
        throw new ArgumentOutOfRangeException(nameof(worker), worker, $"a worker id is in [0, {MaxWorkerId}]; intern (node, worker) names with RadixIndex.WorkerIdOf");

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private long Home(ulong hi) => (long)((hi * Fibonacci) >> (64 - _bits));

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private long Find(ulong hi, ulong lo)
    {
        long i = Home(hi);
        while (true)
        {
            ref Entry e = ref _table[i];
            if (e.IsEmpty)
                return -1;
            if (e.Hi == hi && e.Lo == lo)
                return i;
            i = (i + 1) & _mask;
        }
    }

    // The slot holding the hash, or the first free slot of its probe run.
    private long Probe(ulong hi, ulong lo, out bool found)
    {
        long i = Home(hi);
        while (true)
        {
            ref Entry e = ref _table[i];
            if (e.IsEmpty)
            {
                found = false;
                return i;
            }
            if (e.Hi == hi && e.Lo == lo)
            {
                found = true;
                return i;
            }
            i = (i + 1) & _mask;
        }
    }

    // Frees an entry that nobody holds and nothing hangs from, then its parent if that became the same.
    private void FreeIfDead(long slot)
    {
        while (slot >= 0)
        {
            ref Entry e = ref _table[slot];
            if (e.IsHeld || e.Children != 0)
                return;
            bool hasParent = !e.IsRoot;
            ulong phi = e.ParentHi, plo = e.ParentLo;
            RemoveSlot(slot);
            _count--;
            if (!hasParent)
                return;
            slot = Find(phi, plo);
            if (slot >= 0)
                _table[slot].Children--;
        }
    }

    // Backward-shift deletion for linear probing: no tombstones, probe runs stay as short as the load allows.
    private void RemoveSlot(long hole)
    {
        long j = hole;
        while (true)
        {
            j = (j + 1) & _mask;
            if (_table[j].IsEmpty)
                break;
            long home = Home(_table[j].Hi);
            if (((j - home) & _mask) >= ((j - hole) & _mask))
            {
                _table[hole] = _table[j];
                hole = j;
            }
        }
        _table[hole] = default;
    }

    private void EnsureRoom(int adding)
    {
        long capacity = _mask + 1;
        if (_count + adding <= capacity / 4 * 3)
            return;
        int bits = _bits;
        while ((1L << bits) / 4 * 3 < _count + adding)
            bits++;
        Rehash(bits);
    }

    private void Rehash(int bits)
    {
        var memory = Allocate(bits);
        var table = (Entry*)memory.Address;
        long oldCapacity = _mask + 1;
        Entry* old = _table;
        var oldMemory = _memory;
        _memory = memory;
        _table = table;
        SetBits(bits);
        for (long s = 0; s < oldCapacity; s++)
        {
            if (old[s].IsEmpty)
                continue;
            long i = Home(old[s].Hi);
            while (!_table[i].IsEmpty)
                i = (i + 1) & _mask;
            _table[i] = old[s];
        }
        oldMemory.Dispose();
    }

    private void SetBits(int bits)
    {
        _bits = bits;
        _mask = (1L << bits) - 1;
    }

    // Anonymous mappings come zeroed (every slot empty) and take transparent huge pages: fewer TLB misses on random probes.
    private static AnonymousMemory Allocate(int bits) => new((1L << bits) * sizeof(Entry));
}
