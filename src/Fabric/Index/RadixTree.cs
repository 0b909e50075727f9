using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KvFabric.Blocks;
using KvFabric.Memory;
using KvFabric.Tiers;

namespace KvFabric.Index;

// The global prefix index of one tenant. Block hashes are chained (each commits to its whole prefix), so the radix tree is
// a hash table keyed by the 16-byte hash with a parent link per entry: no edge lists, no string compares.
// Two arrays: the entries (64 bytes, one cache line each) live in an arena in the order they were created, so a chain
// stored in one go lies in consecutive lines and Match streams it instead of missing the cache once per block; an
// open-addressed index of 16-byte slots maps a hash to its entry for everything else.
// Single-threaded: RadixIndex serialises writers and lets readers in only between write batches. Match may run on
// several threads at once (it only reads; its scratch is per thread). docs/index.md has the layout and the costs.
public sealed unsafe partial class RadixTree : IDisposable
{
    // One arena entry: 64 bytes, one cache line (the arena is page-aligned), so a block with up to six holders needs
    // nothing outside it. A free entry is all zero but for Children, which links the free list.
    [StructLayout(LayoutKind.Sequential)]
    private struct Entry
    {
        public ulong Hi;       // Hi = Lo = 0: a free entry (ApplyStored refuses the all-zero hash)
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

    // One index slot: the hash's first 8 bytes, the low 4 of the other 8 (a probe rarely needs the entry to reject a
    // key), and the entry's place in the arena (0 = an empty slot).
    [StructLayout(LayoutKind.Sequential)]
    private struct Slot
    {
        public ulong Hi;
        public uint Tag;
        public uint Ref;
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
    private const uint MaxEntries = uint.MaxValue - 1; // arena refs are uints; 0 means none
    /// <summary>Entries a chain growing a few blocks at a time takes at once: its block and Extent - 1 set aside.</summary>
    public const int Extent = 32;
    private const ulong ReservedMark = 1;   // ParentHi of a reserved entry (whose Hi and Lo are zero, as when free)

    private AnonymousMemory _indexMemory;
    private Slot* _index;
    private int _bits;
    private long _mask;
    private AnonymousMemory _arenaMemory;
    private Entry* _arena;
    private uint _arenaCapacity;  // entries the arena has room for, ref 0 included (never used)
    private uint _arenaTop = 1;   // refs below it have been handed out at least once
    private uint _freeHead;       // a freed entry to reuse once the arena is used up; its Children links the next
    private long _reserved;       // entries kept free after a slowly growing chain's end (see Reserve)
    private long _count;
    private long _indexVersion;  // bumped whenever a slot is added or removed (a prepared index is stale after that)
    private long[] _slots = new long[64];        // ApplyStored's per-event scratch (writer only)
    private long[] _workerLocations = new long[16]; // (block, worker) pairs per worker: lets ClearWorker skip idle workers
    private int _workerLimit;                      // 1 + the largest worker id ever stored: Match sizes its scratch by it

    public RadixTree(long initialBlocks = 1024)
    {
        if (initialBlocks < 0)
            throw new ArgumentOutOfRangeException(nameof(initialBlocks), initialBlocks, "the initial block count cannot be negative");
        if (initialBlocks > MaxEntries - 1)
            throw new ArgumentOutOfRangeException(nameof(initialBlocks), initialBlocks, $"one tree holds at most {MaxEntries - 1} blocks; shard the index across tenants or processes");
        int bits = MinBits;
        while (bits < 40 && (1L << bits) * 3 / 4 < initialBlocks)
            bits++;
        _indexMemory = AllocateIndex(bits);
        _index = (Slot*)_indexMemory.Address;
        SetBits(bits);
        _arenaCapacity = (uint)Math.Max(16, initialBlocks + 1);
        _arenaMemory = new AnonymousMemory((long)_arenaCapacity * sizeof(Entry));
        _arena = (Entry*)_arenaMemory.Address;
        _pool = new uint[4 * 256];
    }

    public long Blocks => _count;
    public long Locations { get; private set; }
    /// <summary>Slots in the hash index (a power of two; at most 3/4 used).</summary>
    public long Capacity => _mask + 1;
    /// <summary>Entries the arena has room for (it grows by doubling when every entry is in use).</summary>
    public long ArenaCapacity => _arenaCapacity;
    /// <summary>Free entries set aside after the ends of chains that grow a few blocks at a time (see docs/index.md).</summary>
    public long ReservedEntries => _reserved;
    public long BytesAllocated => (_mask + 1) * sizeof(Slot) + (long)_arenaCapacity * sizeof(Entry) + OverflowPoolBytes;
    public long OverflowPoolBytes => (long)_pool.Length * sizeof(uint);
    public long RejectedUnknownParent { get; private set; }
    public long RejectedParentMismatch { get; private set; }
    public long RejectedZeroHash { get; private set; }
    public long RemovedNotHeld { get; private set; }
    public long StoredAlreadyHeld { get; private set; }
    public static int EntryBytes => sizeof(Entry);
    public static int SlotBytes => sizeof(Slot);

    public void Dispose()
    {
        _indexMemory.Dispose();
        _arenaMemory.Dispose();
        _index = null;
        _arena = null;
    }

    public ApplyStatus ApplyStored(int worker, BlockHash? parent, ReadOnlySpan<BlockHash> hashes, TierKind tier)
    {
        CheckWorker(worker);
        if ((byte)tier > (byte)TierKind.Ssd)
            return ApplyStatus.BadTier;
        if (hashes.IsEmpty)
            return ApplyStatus.Applied;
        EnsureRoom(hashes.Length);

        // Validate before touching anything, so a rejected event changes nothing. The walk records each block's index
        // slot (found, or the first free slot of its probe run) so that applying does not probe from the start again.
        uint parentRef = 0;
        if (parent is { } p)
        {
            parentRef = (p.Hi | p.Lo) == 0 ? 0 : FindRef(p.Hi, p.Lo);
            if (parentRef == 0)
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
            ref Entry e = ref _arena[_index[slot].Ref];
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

        EnsureEntries(hashes.Length - known);
        uint w1 = (uint)worker + 1;
        uint bit = 1u << (int)tier;
        uint prev = parentRef;
        int created = 0;
        for (int i = 0; i < hashes.Length; i++)
        {
            long slot = _slots[i];
            uint r;
            if (i >= known)
            {
                // New block: the recorded slot was free at validation; blocks inserted since may have taken it.
                var h = hashes[i];
                while (_index[slot].Ref != 0 && !Holds(slot, h.Hi, h.Lo))
                    slot = (slot + 1) & _mask;
                r = _index[slot].Ref;
                if (r == 0)
                {
                    r = NewEntry(prev);
                    created++;
                    ref Entry n = ref _arena[r];
                    n.Hi = h.Hi;
                    n.Lo = h.Lo;
                    if (prev != 0)
                    {
                        ref Entry pe = ref _arena[prev];
                        n.ParentHi = pe.Hi;
                        n.ParentLo = pe.Lo;
                        pe.Children++;
                    }
                    _index[slot] = new Slot { Hi = h.Hi, Tag = (uint)h.Lo, Ref = r };
                    _count++;
                    _indexVersion++;
                }
            }
            else
            {
                r = _index[slot].Ref;
            }
            AddLocation(ref _arena[r], w1, bit);
            prev = r;
        }
        // A few blocks appended under an existing block, ending at the arena's tail: the chain may be growing a block
        // at a time (decode steps), interleaved with other chains; set entries aside so its next blocks follow it.
        if (created is > 0 and < Extent && (parentRef != 0 || known > 0) && prev == _arenaTop - 1)
            Reserve(Extent - 1);
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
            uint r = FindRef(h.Hi, h.Lo);
            if (r == 0 || !RemoveLocation(ref _arena[r], w1, bit))
            {
                RemovedNotHeld++;
                continue;
            }
            removed++;
            FreeIfDead(r);
        }
        return removed;
    }

    // Drops the worker's blocks in one tier (or all tiers for null); a node that left or sent Cleared. Scans the arena,
    // so it costs O(blocks ever held at once) unless the worker holds nothing. Returns the locations or tier bits removed.
    public long ClearWorker(int worker, TierKind? tier)
    {
        CheckWorker(worker);
        if (worker >= _workerLocations.Length || _workerLocations[worker] == 0)
            return 0;
        uint w1 = (uint)worker + 1;
        uint bits = tier is { } t ? 1u << (int)t : 7u;
        long removed = 0;
        for (uint r = 1; r < _arenaTop; r++)
        {
            ref Entry e = ref _arena[r];
            if (e.IsEmpty || !RemoveLocation(ref e, w1, bits))
                continue;
            removed++;
            // Entries never move, and freeing only reaches this one and its ancestors (which still had a child when the
            // scan passed them or have yet to be scanned, and are skipped once free): safe during the scan.
            FreeIfDead(r);
        }
        return removed;
    }

    public bool Contains(BlockHash hash) => FindRef(hash.Hi, hash.Lo) != 0;

    private static void CheckWorker(int worker)
    {
        if ((uint)worker > MaxWorkerId)
            ThrowWorker(worker);
    }

    private static void ThrowWorker(int worker) =>
        throw new ArgumentOutOfRangeException(nameof(worker), worker, $"a worker id is in [0, {MaxWorkerId}]; intern (node, worker) names with RadixIndex.WorkerIdOf");

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private long Home(ulong hi) => (long)((hi * Fibonacci) >> (64 - _bits));

    // Whether the occupied slot is the hash's: the slot's 12 bytes first, the entry's Lo only when they agree.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private bool Holds(long slot, ulong hi, ulong lo)
    {
        ref Slot s = ref _index[slot];
        return s.Hi == hi && s.Tag == (uint)lo && _arena[s.Ref].Lo == lo;
    }

    // The index slot holding the hash, or -1.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private long FindSlot(ulong hi, ulong lo)
    {
        long i = Home(hi);
        while (true)
        {
            if (_index[i].Ref == 0)
                return -1;
            if (Holds(i, hi, lo))
                return i;
            i = (i + 1) & _mask;
        }
    }

    // The hash's entry in the arena, or 0.
    private uint FindRef(ulong hi, ulong lo)
    {
        long slot = FindSlot(hi, lo);
        return slot < 0 ? 0 : _index[slot].Ref;
    }

    // The index slot holding the hash, or the first free slot of its probe run.
    private long Probe(ulong hi, ulong lo, out bool found)
    {
        long i = Home(hi);
        while (true)
        {
            if (_index[i].Ref == 0)
            {
                found = false;
                return i;
            }
            if (Holds(i, hi, lo))
            {
                found = true;
                return i;
            }
            i = (i + 1) & _mask;
        }
    }

    // The next entry for a block under `parent` (0: a root): the entry after the parent if it was set aside for it;
    // else the arena's unused tail, so that a chain stored in one go lies in consecutive lines for Match to stream;
    // freed entries once the tail is used up. ApplyStored has made room (EnsureEntries).
    private uint NewEntry(uint parent)
    {
        uint next = parent + 1;
        if (parent != 0 && next < _arenaTop && IsReserved(next))
        {
            _arena[next] = default;
            _reserved--;
            return next;
        }
        if (_arenaTop < _arenaCapacity)
            return _arenaTop++;
        uint r = _freeHead;
        _freeHead = _arena[r].Children;
        _arena[r].Children = 0;
        return r;
    }

    private bool IsReserved(uint r) => _arena[r].IsEmpty && _arena[r].ParentHi == ReservedMark;

    // Sets up to `count` entries of the unused tail aside for the chain that ends at the entry before them: a chain
    // growing a block at a time while other chains do the same then takes consecutive entries (runs of Extent) instead
    // of one entry in every few. Never grows the arena; reserved entries are free for anyone once the arena is full
    // (ReclaimReserved).
    private void Reserve(int count)
    {
        uint n = (uint)Math.Min(count, _arenaCapacity - _arenaTop);
        for (uint k = 0; k < n; k++)
            _arena[_arenaTop + k].ParentHi = ReservedMark;
        _arenaTop += n;
        _reserved += n;
    }

    // Puts every reserved entry on the free list: one scan, done only when the arena would otherwise grow.
    private void ReclaimReserved()
    {
        for (uint r = _arenaTop - 1; r >= 1 && _reserved > 0; r--)
        {
            if (!IsReserved(r))
                continue;
            _arena[r] = default;
            _arena[r].Children = _freeHead;
            _freeHead = r;
            _reserved--;
        }
    }

    // Frees an entry that nobody holds and nothing hangs from, then its parent if that became the same.
    private void FreeIfDead(uint r)
    {
        while (r != 0)
        {
            ref Entry e = ref _arena[r];
            if (e.IsHeld || e.Children != 0)
                return;
            bool hasParent = !e.IsRoot;
            ulong phi = e.ParentHi, plo = e.ParentLo;
            RemoveSlot(FindSlot(e.Hi, e.Lo));
            e = default;
            e.Children = _freeHead;
            _freeHead = r;
            _count--;
            if (!hasParent)
                return;
            r = FindRef(phi, plo);
            if (r != 0)
                _arena[r].Children--;
        }
    }

    // Backward-shift deletion for linear probing: no tombstones, probe runs stay as short as the load allows. Only the
    // 16-byte slots move; entries keep their place in the arena.
    private void RemoveSlot(long hole)
    {
        _indexVersion++;
        long j = hole;
        while (true)
        {
            j = (j + 1) & _mask;
            if (_index[j].Ref == 0)
                break;
            long home = Home(_index[j].Hi);
            if (((j - home) & _mask) >= ((j - hole) & _mask))
            {
                _index[hole] = _index[j];
                hole = j;
            }
        }
        _index[hole] = default;
    }

    // Room in the index for `adding` more blocks (the arena's room is settled once the event is validated).
    private void EnsureRoom(int adding)
    {
        long capacity = _mask + 1;
        if (_count + adding > capacity / 4 * 3)
        {
            int bits = _bits;
            while ((1L << bits) / 4 * 3 < _count + adding)
                bits++;
            Rehash(bits);
        }
    }

    private void Rehash(int bits) => Install(BuildIndex(bits));

    // A copy of the index with 2^bits slots. Only reads the tree, so it may run while readers Match (RadixIndex builds
    // it outside its write lock: see PrepareGrowth).
    private PreparedIndex BuildIndex(int bits)
    {
        var memory = AllocateIndex(bits);
        var index = (Slot*)memory.Address;
        long mask = (1L << bits) - 1;
        long capacity = _mask + 1;
        for (long s = 0; s < capacity; s++)
        {
            if (_index[s].Ref == 0)
                continue;
            long i = (long)((_index[s].Hi * Fibonacci) >> (64 - bits));
            while (index[i].Ref != 0)
                i = (i + 1) & mask;
            index[i] = _index[s];
        }
        return new PreparedIndex(this, memory, bits, _indexVersion);
    }

    private void Install(PreparedIndex prepared)
    {
        var memory = prepared.Take() ?? throw new InvalidOperationException("this prepared index was already installed or discarded");
        var oldMemory = _indexMemory;
        _indexMemory = memory;
        _index = (Slot*)memory.Address;
        SetBits(prepared.Bits);
        oldMemory.Dispose();
    }

    /// <summary>
    /// A bigger index built ahead for one tree, to be installed once by <see cref="CommitGrowth"/> if that tree has not
    /// changed meanwhile; disposing it gives its memory back (an installed one's memory is the tree's).
    /// </summary>
    internal sealed class PreparedIndex(RadixTree owner, AnonymousMemory memory, int bits, long version) : IDisposable
    {
        private AnonymousMemory? _memory = memory;
        internal RadixTree Owner { get; } = owner;
        internal int Bits { get; } = bits;
        internal long Version { get; } = version;

        internal AnonymousMemory? Take() => Interlocked.Exchange(ref _memory, null);

        public void Dispose() => Take()?.Dispose();
    }

    /// <summary>
    /// Whether the index is near the load (11/16, against the 3/4 at which an event would rehash it itself) at which
    /// growing it ahead, with <see cref="PrepareGrowth"/> outside the readers' lock, saves them a pause.
    /// </summary>
    internal bool GrowthDue => _count > (_mask + 1) / 16 * 11;

    /// <summary>
    /// Builds the doubled index from the current one. It only reads the tree, so the single writer may call it while
    /// readers Match; <see cref="CommitGrowth"/> then swaps it in (under the write lock) in microseconds, where a
    /// rehash inside the lock held readers off for the whole copy (0.2-0.9 s at 4-17M slots on the dev VM).
    /// </summary>
    internal PreparedIndex PrepareGrowth() => BuildIndex(_bits + 1);

    /// <summary>Installs an index from <see cref="PrepareGrowth"/>; false (and disposed) if the tree changed since.</summary>
    internal bool CommitGrowth(PreparedIndex prepared)
    {
        ArgumentNullException.ThrowIfNull(prepared);
        if (!ReferenceEquals(prepared.Owner, this))
            throw new ArgumentException("the index was prepared by another tree", nameof(prepared));
        if (prepared.Version != _indexVersion || prepared.Bits <= _bits || _index == null)
        {
            prepared.Dispose();
            return false;
        }
        Install(prepared);
        return true;
    }

    // Room in the arena for `adding` new entries: its unused tail plus the free list (every entry handed out, not
    // counted and not reserved is on it). Reclaims the reserved entries, then doubles the arena, when short: mremap
    // moves its pages instead of copying them, and entries keep their refs, so the index is untouched.
    private void EnsureEntries(int adding)
    {
        if ((long)_arenaCapacity - 1 - _count - _reserved >= adding)
            return;
        if (_reserved > 0)
        {
            ReclaimReserved();
            if ((long)_arenaCapacity - 1 - _count >= adding)
                return;
        }
        long needed = _count + adding + 1;
        if (needed > MaxEntries)
            throw new InvalidOperationException($"one tree holds at most {MaxEntries - 1} blocks; shard the index across tenants or processes");
        long capacity = Math.Min(Math.Max(needed, 2L * _arenaCapacity), MaxEntries);
        _arenaMemory.Grow(capacity * sizeof(Entry));
        _arena = (Entry*)_arenaMemory.Address;
        _arenaCapacity = (uint)capacity;
    }

    private void SetBits(int bits)
    {
        _bits = bits;
        _mask = (1L << bits) - 1;
    }

    // Anonymous mappings come zeroed (every slot empty) and take transparent huge pages: fewer TLB misses on random probes.
    private static AnonymousMemory AllocateIndex(int bits) => new((1L << bits) * sizeof(Slot));
}
