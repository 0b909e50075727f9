using KvFabric.Blocks;
using KvFabric.Memory;
using KvFabric.Tiers;

namespace KvFabric.Service;

public sealed record HostMemoryStoreOptions
{
    public required KvLayout Layout { get; init; }
    public required long CapacityBytes { get; init; }
    public string Node { get; init; } = Environment.MachineName;
    /// <summary>Place the pool in /dev/shm so node-local processes can map it.</summary>
    public bool Shared { get; init; } = true;
    public bool LockInRam { get; init; }
}

/// <summary>
/// The sidecar's block store until the tier manager serves it: one host tier over a HostBlockPool with exact byte
/// accounting and no eviction (a Put over capacity fails with StoreFullException and changes nothing).
/// Thread-safe: one lock guards the map; bytes are copied outside it.
/// </summary>
public sealed class HostMemoryStore : IFabricStore
{
    private readonly HostBlockPool _pool;
    private readonly NativeMemoryManager[] _slotMemory;
    private readonly Dictionary<BlockKey, Entry> _blocks = new();
    private readonly Dictionary<ulong, (uint Tenant, BlockKey[] Keys, DateTimeOffset Expires)> _leases = new();
    private readonly Lock _lock = new();
    private readonly Timer _leaseTimer;
    private ulong _nextLease;
    private long _lookups, _hitBlocks, _missBlocks, _hits;

    private sealed class Entry(BlockSlot slot, BlockHash? parent, int depth)
    {
        public readonly BlockSlot Slot = slot;
        public readonly BlockHash? Parent = parent;
        public readonly int Depth = depth;
        public int Readers;
        public int Pins;
        public bool Removed;
    }

    public HostMemoryStore(HostMemoryStoreOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        Layout = options.Layout;
        if (options.Layout.BlockBytes > int.MaxValue / 2)
            throw new ArgumentException($"blocks of {options.Layout.BlockBytes} bytes are too large for the host store (at most 1 GiB)");
        BlockBytes = (int)options.Layout.BlockBytes;
        if (options.CapacityBytes < BlockBytes)
            throw new ArgumentOutOfRangeException(nameof(options), options.CapacityBytes,
                $"host tier capacity must hold at least one block of {BlockBytes} bytes");
        Node = options.Node;
        _pool = new HostBlockPool(new HostBlockPoolOptions
        {
            SlotBytes = BlockBytes,
            SlotCount = (int)Math.Min(options.CapacityBytes / BlockBytes, int.MaxValue),
            Shared = options.Shared,
            LockInRam = options.LockInRam,
            Tag = "host-tier",
        });
        _slotMemory = new NativeMemoryManager[_pool.Capacity];
        for (int i = 0; i < _slotMemory.Length; i++)
            _slotMemory[i] = new NativeMemoryManager(_pool.SlotAt(i).Address, BlockBytes);
        Implementation = options.Shared ? "host-pool(shared /dev/shm)" : "host-pool(private)";
        _leaseTimer = new Timer(_ => ExpireLeases(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
    }

    public KvLayout Layout { get; }
    public int BlockBytes { get; }
    public string Node { get; }
    public string Implementation { get; }
    public KvEventLogs Events { get; } = new();
    public long CapacityBytes => (long)_pool.Capacity * BlockBytes;

    public int Lookup(uint tenant, ReadOnlySpan<BlockHash> chain, Span<TierKind> tiers)
    {
        int matched = 0;
        lock (_lock)
        {
            while (matched < chain.Length && _blocks.ContainsKey(new BlockKey(tenant, chain[matched])))
            {
                if (matched < tiers.Length)
                    tiers[matched] = TierKind.Host;
                matched++;
            }

            _lookups++;
            _hitBlocks += matched;
            _missBlocks += chain.Length - matched;
        }

        return matched;
    }

    public IPutBatch BeginPut(uint tenant) => new PutBatch(this, tenant);

    public ValueTask<ReadLease?> OpenReadAsync(uint tenant, BlockHash hash, CancellationToken cancellationToken)
    {
        lock (_lock)
        {
            if (!_blocks.TryGetValue(new BlockKey(tenant, hash), out Entry? e))
                return ValueTask.FromResult<ReadLease?>(null);
            e.Readers++;
            _hits++;
            return ValueTask.FromResult<ReadLease?>(new HostReadLease(this, e));
        }
    }

    public PinLease Pin(uint tenant, ReadOnlySpan<BlockHash> hashes, TimeSpan lease)
    {
        var keys = new BlockKey[hashes.Length];
        for (int i = 0; i < keys.Length; i++)
            keys[i] = new BlockKey(tenant, hashes[i]);
        lock (_lock)
        {
            foreach (BlockKey k in keys)
            {
                if (!_blocks.ContainsKey(k))
                    throw new BlockNotFoundException($"block {k.Hash} is not cached; nothing was pinned");
            }

            foreach (BlockKey k in keys)
                _blocks[k].Pins++;
            ulong id = ++_nextLease;
            var expires = DateTimeOffset.UtcNow + lease;
            _leases[id] = (tenant, keys, expires);
            return new PinLease(id, keys.Length, expires);
        }
    }

    public bool Unpin(uint tenant, ulong leaseId)
    {
        lock (_lock)
        {
            if (!_leases.TryGetValue(leaseId, out var lease) || lease.Tenant != tenant)
                return false;
            ReleaseLease(leaseId, lease.Keys);
            return true;
        }
    }

    public ValueTask<int> DeleteAsync(uint tenant, BlockHash[] hashes) => ValueTask.FromResult(Delete(tenant, hashes));

    private int Delete(uint tenant, ReadOnlySpan<BlockHash> hashes)
    {
        lock (_lock)
        {
            // The blocks named and every cached descendant (a child without its parent would be unreachable by prefix).
            var doomed = new HashSet<BlockKey>();
            foreach (BlockHash h in hashes)
            {
                var k = new BlockKey(tenant, h);
                if (_blocks.ContainsKey(k))
                    doomed.Add(k);
            }

            bool grew = doomed.Count > 0;
            while (grew)
            {
                grew = false;
                foreach (var (k, e) in _blocks)
                {
                    if (k.Tenant == tenant && e.Parent is { } p && doomed.Contains(new BlockKey(tenant, p)) && doomed.Add(k))
                        grew = true;
                }
            }

            foreach (BlockKey k in doomed)
            {
                if (_blocks[k].Pins > 0)
                    throw new BlockPinnedException($"block {k.Hash} is pinned by a lease; unpin it (or wait for the lease to end) before deleting; nothing was deleted");
            }

            foreach (BlockKey k in doomed)
            {
                Entry e = _blocks[k];
                _blocks.Remove(k);
                e.Removed = true;
                if (e.Readers == 0)
                    _pool.Return(e.Slot);
            }

            if (doomed.Count > 0)
                Events.Append(tenant, KvEventKind.Removed, null, doomed.Select(k => k.Hash).ToArray(), TierKind.Host);
            return doomed.Count;
        }
    }

    public StoreStats GetStats(uint tenant)
    {
        lock (_lock)
        {
            long tenantBlocks = _blocks.Keys.Count(k => k.Tenant == tenant);
            var tier = new TierStatsSnapshot(TierKind.Host, CapacityBytes, (long)_blocks.Count * BlockBytes, _blocks.Count, _hits, 0, Implementation);
            return new StoreStats([tier], _lookups, _hitBlocks, _missBlocks, tenantBlocks, tenantBlocks * BlockBytes);
        }
    }

    public (ulong Sequence, IReadOnlyList<KvEvent> Events) Snapshot(uint tenant)
    {
        lock (_lock)
        {
            ulong seq = Events.LastSequence(tenant);
            var events = _blocks.Where(kv => kv.Key.Tenant == tenant)
                .OrderBy(kv => kv.Value.Depth)
                .Select(kv => new KvEvent(seq, KvEventKind.Stored, kv.Value.Parent, [kv.Key.Hash], TierKind.Host, Snapshot: true))
                .ToList();
            return (seq, events);
        }
    }

    private void ExpireLeases()
    {
        var now = DateTimeOffset.UtcNow;
        lock (_lock)
        {
            foreach (var (id, lease) in _leases.Where(l => l.Value.Expires <= now).ToList())
                ReleaseLease(id, lease.Keys);
        }
    }

    private void ReleaseLease(ulong id, BlockKey[] keys)
    {
        _leases.Remove(id);
        foreach (BlockKey k in keys)
        {
            if (_blocks.TryGetValue(k, out Entry? e))
                e.Pins--;
        }
    }

    public void Dispose()
    {
        _leaseTimer.Dispose();
        _pool.Dispose();
    }

    private sealed class HostReadLease(HostMemoryStore store, Entry entry) : ReadLease
    {
        private int _done;

        public override ReadOnlyMemory<byte> Bytes => store._slotMemory[entry.Slot.Index].Memory;
        public override TierKind Tier => TierKind.Host;

        public override void Dispose()
        {
            if (Interlocked.Exchange(ref _done, 1) != 0)
                return;
            lock (store._lock)
            {
                if (--entry.Readers == 0 && entry.Removed)
                    store._pool.Return(entry.Slot);
            }
        }
    }

    private sealed class PutBatch(HostMemoryStore store, uint tenant) : IPutBatch
    {
        private readonly List<(BlockHash Hash, BlockHash? Parent, int Depth, BlockSlot Slot)> _staged = new();
        private bool _committed;

        public Memory<byte> Add(BlockHash hash, BlockHash? parent, int depth)
        {
            if (_committed)
                throw new InvalidOperationException("this Put was already committed");
            if (!store._pool.TryRent(out BlockSlot slot))
            {
                throw new StoreFullException(
                    $"the host tier is full ({store._pool.Capacity} blocks of {store.BlockBytes} bytes, {store._pool.Capacity - store._pool.Available} in use or staged); delete blocks or give the node more capacity");
            }

            _staged.Add((hash, parent, depth, slot));
            return store._slotMemory[slot.Index].Memory;
        }

        public ValueTask<PutOutcome> CommitAsync(CancellationToken cancellationToken)
        {
            cancellationToken.ThrowIfCancellationRequested();
            int stored = 0, present = 0;
            lock (store._lock)
            {
                var run = new List<BlockHash>();
                BlockHash? runParent = null;
                foreach (var (hash, parent, depth, slot) in _staged)
                {
                    var key = new BlockKey(tenant, hash);
                    if (store._blocks.ContainsKey(key))
                    {
                        store._pool.Return(slot);
                        present++;
                        continue;
                    }

                    store._blocks[key] = new Entry(slot, parent, depth);
                    stored++;
                    // One Stored event per run of consecutive chain blocks.
                    if (run.Count > 0 && parent != run[^1])
                    {
                        store.Events.Append(tenant, KvEventKind.Stored, runParent, run.ToArray(), TierKind.Host);
                        run.Clear();
                    }

                    if (run.Count == 0)
                        runParent = parent;
                    run.Add(hash);
                }

                if (run.Count > 0)
                    store.Events.Append(tenant, KvEventKind.Stored, runParent, run.ToArray(), TierKind.Host);
                _staged.Clear();
                _committed = true;
            }

            return ValueTask.FromResult(new PutOutcome(stored, present));
        }

        public void Dispose()
        {
            foreach (var s in _staged)
                store._pool.Return(s.Slot);
            _staged.Clear();
        }
    }
}
