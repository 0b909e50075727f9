using System.Buffers;
using System.Diagnostics;
using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Service;

/// <summary>
/// The sidecar's storage: the API's view (IFabricStore) of a TierManager. Lookups go through the load-versus-recompute
/// gate; Put stages a call's blocks in pooled buffers and hands each chain to the manager when the stream ends (undoing
/// what it stored if a later part fails); Get reads a block from its fastest tier into a pooled buffer held while it is
/// streamed. The manager's per-node events are re-sequenced into per-tenant logs for SubscribeEvents.
/// </summary>
public sealed class TieredFabricStore : IFabricStore, IKvEventSink
{
    private readonly TierManager _tiers;
    // Lease ids are forgotten on the monotonic clock, as the tier manager lapses the pins themselves.
    private readonly Dictionary<ulong, (uint Tenant, BlockHash[] Hashes, long Deadline)> _leases = new();
    private readonly Lock _lock = new();
    private readonly int _maxStagedBlocks;
    // Blocks that Put commits in progress are placing (under _lock): how many commits, and whether more than one took
    // part (one placed it, another found it present and will report it stored), in which case a failed commit's undo
    // must keep it.
    private readonly Dictionary<BlockKey, (int Commits, bool Shared)> _placing = new();
    private int _staged;
    private readonly SemaphoreSlim _readBuffers;
    private static readonly TimeSpan ReadBufferWait = TimeSpan.FromSeconds(30);
    private ulong _nextLease;
    private long _lookups, _hitBlocks, _missBlocks;

    /// <param name="build">Builds the manager with this store as its event sink.</param>
    /// <param name="eventLogCapacity">Events kept per tenant for subscribers that fall behind (they get a snapshot beyond it).</param>
    /// <param name="readBuffers">Block buffers that reads of blocks outside host memory (Get, Export) may hold at once,
    /// node-wide: what bounds the memory of many Gets of SSD or GPU blocks.</param>
    public TieredFabricStore(KvLayout layout, string node, int maxStagedBlocks, Func<IKvEventSink, TierManager> build, int eventLogCapacity = 65536,
        int readBuffers = 16)
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(build);
        if (layout.BlockBytes > Array.MaxLength)
            throw new ArgumentException($"blocks of {layout.BlockBytes} bytes are too large (at most {Array.MaxLength})");
        if (maxStagedBlocks < 1)
            throw new ArgumentOutOfRangeException(nameof(maxStagedBlocks), maxStagedBlocks, "Put needs at least one staging buffer");
        Layout = layout;
        BlockBytes = (int)layout.BlockBytes;
        Node = node;
        Events = new KvEventLogs(eventLogCapacity);
        _maxStagedBlocks = maxStagedBlocks;
        if (readBuffers < 1)
            throw new ArgumentOutOfRangeException(nameof(readBuffers), readBuffers, "reads of blocks outside host memory need at least one buffer");
        _readBuffers = new SemaphoreSlim(readBuffers, readBuffers);
        ReadBufferCount = readBuffers;
        _tiers = build(this);
    }

    /// <summary>Block buffers reads of blocks outside host memory may hold at once (node-wide).</summary>
    public int ReadBufferCount { get; }

    public KvLayout Layout { get; }
    public int BlockBytes { get; }
    public string Node { get; }
    public KvEventLogs Events { get; }
    public TierManager Manager => _tiers;

    // Block copies per (tenant, tier), kept from the events so Stats never walks the index.
    private readonly Dictionary<(uint Tenant, TierKind Tier), long> _copies = new();

    private void CountCopy(uint tenant, TierKind tier, long delta)
    {
        lock (_copies)
            _copies[(tenant, tier)] = _copies.GetValueOrDefault((tenant, tier)) + delta;
    }

    void IKvEventSink.OnEvent(in Tiers.KvEvent e)
    {
        switch (e.Kind)
        {
            case Tiers.KvEventKind.Stored:
                CountCopy(e.Tenant, e.Tier, 1);
                Events.Append(e.Tenant, KvEventKind.Stored, e.HasParent ? e.Parent : null, [e.Block], e.Tier);
                break;
            case Tiers.KvEventKind.Removed:
                CountCopy(e.Tenant, e.Tier, -1);
                Events.Append(e.Tenant, KvEventKind.Removed, null, [e.Block], e.Tier);
                break;
            default:
                TierKind cleared = e.Tier;
                lock (_copies)
                {
                    foreach (var k in _copies.Keys.Where(k => k.Tier == cleared).ToList())
                        _copies[k] = 0;
                }

                Events.AppendToAll(KvEventKind.Cleared, e.Tier);
                break;
        }
    }

    public int Lookup(uint tenant, ReadOnlySpan<BlockHash> chain, Span<TierKind> tiers)
    {
        Span<TierKind> found = tiers.Length >= chain.Length ? tiers : new TierKind[chain.Length];
        LookupResult r = _tiers.Lookup(tenant, chain, found);
        Interlocked.Increment(ref _lookups);
        Interlocked.Add(ref _hitBlocks, r.Served);
        Interlocked.Add(ref _missBlocks, chain.Length - r.Served);
        return r.Served; // a hit slower to load than to recompute is reported as a miss
    }

    public IPutBatch BeginPut(uint tenant) => new PutBatch(this, tenant);

    public ValueTask<ReadLease?> OpenReadAsync(uint tenant, BlockHash hash, CancellationToken cancellationToken)
    {
        // Host memory serves in place; a block in another tier (device memory, SSD) is held in use now and read into a
        // buffer of the bounded pool when its bytes are asked for, so that a Get of many such blocks holds one at a time.
        if (_tiers.TryOpenInPlace(tenant, hash, out ReadOnlyMemory<byte> inPlace, out TierKind inPlaceTier) is { } scope)
            return ValueTask.FromResult<ReadLease?>(new InPlaceLease(scope, inPlace, inPlaceTier));
        BlockUseScope held = _tiers.Acquire(tenant, [hash]);
        int residency = _tiers.Residency(new BlockKey(tenant, hash));
        if (held.Count == 0 || residency == 0)
        {
            held.Dispose();
            Interlocked.Increment(ref _missBlocks);
            return ValueTask.FromResult<ReadLease?>(null);
        }
        TierKind tier = _tiers.Tiers[System.Numerics.BitOperations.TrailingZeroCount(residency)];
        return ValueTask.FromResult<ReadLease?>(new BufferLease(this, tenant, hash, held, tier));
    }

    public PinLease Pin(uint tenant, ReadOnlySpan<BlockHash> hashes, TimeSpan lease)
    {
        var copy = hashes.ToArray();
        foreach (BlockHash h in copy)
        {
            if (_tiers.Residency(new BlockKey(tenant, h)) == 0)
                throw new BlockNotFoundException($"block {h} is not cached; nothing was pinned");
        }

        int pinned = _tiers.Pin(tenant, copy, lease);
        if (pinned < copy.Length)
        {
            _tiers.Unpin(tenant, copy);
            throw new BlockNotFoundException($"{copy.Length - pinned} of the blocks left the cache while being pinned; nothing was pinned");
        }

        lock (_lock)
        {
            ExpireLeases();
            ulong id = ++_nextLease;
            _leases[id] = (tenant, copy, Stopwatch.GetTimestamp() + (long)(lease.TotalSeconds * Stopwatch.Frequency));
            return new PinLease(id, pinned, DateTimeOffset.UtcNow + lease);
        }
    }

    public bool Unpin(uint tenant, ulong leaseId)
    {
        BlockHash[] hashes;
        lock (_lock)
        {
            ExpireLeases();
            if (!_leases.TryGetValue(leaseId, out var lease) || lease.Tenant != tenant)
                return false;
            _leases.Remove(leaseId);
            hashes = lease.Hashes;
        }

        _tiers.Unpin(tenant, hashes);
        return true;
    }

    // The manager lapses expired pins itself; here only the lease ids are forgotten.
    private void ExpireLeases()
    {
        long now = Stopwatch.GetTimestamp();
        foreach (var (id, l) in _leases.Where(kv => kv.Value.Deadline <= now).ToList())
            _leases.Remove(id);
    }

    public async ValueTask<int> DeleteAsync(uint tenant, BlockHash[] hashes, CancellationToken cancellationToken)
    {
        int deleted = 0, kept = 0;
        foreach (BlockHash h in hashes)
        {
            DeleteResult r = await _tiers.DeleteAsync(tenant, h, cancellationToken).ConfigureAwait(false);
            deleted += r.Deleted;
            kept += r.KeptBusy;
        }

        if (kept > 0 && deleted == 0)
            throw new BlockPinnedException($"{kept} block(s) are pinned or in use; unpin them (or wait for the lease to end) before deleting; nothing was deleted");
        return deleted;
    }

    public StoreStats GetStats(uint tenant)
    {
        TierManagerStats s = _tiers.Stats();
        var tiers = s.Tiers.Select(t => new TierStatsSnapshot(t.Kind, t.CapacityBytes, t.UsedBytes, t.Blocks, t.Hits, t.Evictions,
            $"{_tiers.GetStore(t.Kind)}; policy {t.Policy}")).ToList();
        long tenantBlocks;
        lock (_copies)
            tenantBlocks = _copies.Where(kv => kv.Key.Tenant == tenant).Sum(kv => kv.Value);
        return new StoreStats(tiers, Interlocked.Read(ref _lookups), Interlocked.Read(ref _hitBlocks), Interlocked.Read(ref _missBlocks),
            tenantBlocks, tenantBlocks * BlockBytes);
    }

    public (ulong Sequence, IReadOnlyList<KvEvent> Events) Snapshot(uint tenant)
    {
        // Optimistic: the snapshot is consistent with the log when no event arrived while it was taken.
        for (int attempt = 0; ; attempt++)
        {
            ulong before = Events.LastSequence(tenant);
            IReadOnlyList<Tiers.KvEvent> all = _tiers.SnapshotEvents();
            if (Events.LastSequence(tenant) == before || attempt == 3)
            {
                return (before, all.Where(e => e.Tenant == tenant)
                    .Select(e => new KvEvent(before, KvEventKind.Stored, e.HasParent ? e.Parent : null, [e.Block], e.Tier, Snapshot: true))
                    .ToList());
            }
        }
    }

    public void Dispose() => _tiers.Dispose();

    private sealed class InPlaceLease(BlockUseScope scope, ReadOnlyMemory<byte> bytes, TierKind tier) : ReadLease
    {
        public override TierKind Tier => tier;
        public override ValueTask<ReadOnlyMemory<byte>> LoadAsync(CancellationToken cancellationToken) => ValueTask.FromResult(bytes);
        public override void Dispose() => scope.Dispose();
    }

    // A block outside host memory: held in use (not evicted, moved out or deleted) from open to Dispose; read on LoadAsync
    // into a buffer taken from the store's bounded pool (a semaphore over ArrayPool buffers), given back on Dispose.
    private sealed class BufferLease(TieredFabricStore store, uint tenant, BlockHash hash, BlockUseScope held, TierKind tier) : ReadLease
    {
        private byte[]? _buffer;
        private int _disposed;

        public override TierKind Tier => tier;

        public override async ValueTask<ReadOnlyMemory<byte>> LoadAsync(CancellationToken cancellationToken)
        {
            ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
            if (_buffer is { } loaded)
                return loaded.AsMemory(0, store.BlockBytes);
            if (!await store._readBuffers.WaitAsync(ReadBufferWait, cancellationToken).ConfigureAwait(false))
                throw new StoreFullException($"all {store.ReadBufferCount} read buffers of node {store.Node} (for blocks outside host memory) stayed in use "
                    + $"for {ReadBufferWait.TotalSeconds:0} s; retry, ask for fewer blocks at once, or raise read_buffers");
            byte[] buffer = ArrayPool<byte>.Shared.Rent(store.BlockBytes);
            try
            {
                int read = await store._tiers.GetAsync(tenant, new[] { hash }, [buffer.AsMemory(0, store.BlockBytes)], cancellationToken).ConfigureAwait(false);
                if (read == 0)
                    throw new BlockNotFoundException($"block {hash} could no longer be read from the {tier} tier of node {store.Node} (it failed its "
                        + "checksum and was dropped); Put it again or recompute it");
            }
            catch
            {
                ArrayPool<byte>.Shared.Return(buffer);
                store._readBuffers.Release();
                throw;
            }
            _buffer = buffer;
            return buffer.AsMemory(0, store.BlockBytes);
        }

        public override void Dispose()
        {
            if (Interlocked.Exchange(ref _disposed, 1) != 0)
                return;
            if (_buffer is { } b)
            {
                _buffer = null;
                ArrayPool<byte>.Shared.Return(b);
                store._readBuffers.Release();
            }
            held.Dispose();
        }
    }

    private sealed class PutBatch(TieredFabricStore store, uint tenant) : IPutBatch
    {
        // Buffer: a staging buffer rented for the block (null when its bytes are borrowed from the caller).
        private readonly List<(BlockHash Hash, BlockHash? Parent, byte[]? Buffer, ReadOnlyMemory<byte> Bytes)> _staged = new();
        private int _rented;
        private readonly List<BlockKey> _claimed = new();
        private bool _done;

        public Memory<byte> Add(BlockHash hash, BlockHash? parent, int depth)
        {
            ObjectDisposedException.ThrowIf(_done, this);
            if (Interlocked.Increment(ref store._staged) > store._maxStagedBlocks)
            {
                Interlocked.Decrement(ref store._staged);
                throw new StoreFullException(
                    $"{store._maxStagedBlocks} blocks are already staged by Puts in progress on this node; send fewer blocks per Put (or fewer Puts at once), or raise put_staging_blocks");
            }

            byte[] buffer = ArrayPool<byte>.Shared.Rent(store.BlockBytes);
            _rented++;
            _staged.Add((hash, parent, buffer, buffer.AsMemory(0, store.BlockBytes)));
            return buffer.AsMemory(0, store.BlockBytes);
        }

        // Borrowed bytes hold no staging memory, so they do not count against put_staging_blocks.
        public void AddBorrowed(BlockHash hash, BlockHash? parent, int depth, ReadOnlyMemory<byte> bytes)
        {
            ObjectDisposedException.ThrowIf(_done, this);
            if (bytes.Length != store.BlockBytes)
                throw new ArgumentException($"block {hash} has {bytes.Length} bytes; this node's blocks are exactly {store.BlockBytes}", nameof(bytes));
            _staged.Add((hash, parent, null, bytes));
        }

        public async ValueTask<PutOutcome> CommitAsync(CancellationToken cancellationToken)
        {
            ObjectDisposedException.ThrowIf(_done, this);
            // A chain longer than every tier together can never be stored: refuse before anything moves.
            long capacityBlocks = store._tiers.Stats().Tiers.Sum(t => t.CapacityBytes / store.BlockBytes);
            if (_staged.Count > capacityBlocks)
            {
                throw new StoreFullException(
                    $"this Put carries {_staged.Count} blocks but all tiers together hold {capacityBlocks}; nothing was stored");
            }

            var newlyStored = new List<BlockHash>();
            var declined = new HashSet<BlockHash>();
            int stored = 0, present = 0, notAdmitted = 0;
            try
            {
                int i = 0;
                while (i < _staged.Count)
                {
                    // One run: consecutive staged blocks each the child of the one before.
                    int end = i + 1;
                    while (end < _staged.Count && _staged[end].Parent == _staged[end - 1].Hash)
                        end++;
                    var run = new List<BlockPut>(end - i);
                    for (int k = i; k < end; k++)
                        run.Add(new BlockPut(_staged[k].Hash, _staged[k].Bytes));
                    var mine = new bool[run.Count];
                    Claim(run);
                    PutResult r;
                    try
                    {
                        r = await store._tiers.PutAsync(tenant, _staged[i].Parent, run, mine, cancellationToken).ConfigureAwait(false);
                    }
                    finally
                    {
                        // Also when the put threw (cancelled mid-run): what it placed is this call's to undo.
                        for (int k = 0; k < mine.Length; k++)
                        {
                            if (mine[k])
                                newlyStored.Add(run[k].Hash);
                        }
                    }

                    if (r.Status == PutStatus.ParentMissing && _staged[i].Parent is { } p && declined.Contains(p))
                    {
                        // A branch off a block the cache declined earlier in this call: declined with it.
                        notAdmitted += run.Count;
                        foreach (BlockPut b in run)
                            declined.Add(b.Hash);
                        i = end;
                        continue;
                    }

                    if (r.Status == PutStatus.ParentMissing)
                    {
                        throw new BlockNotFoundException(
                            $"the parent {_staged[i].Parent} of block {_staged[i].Hash} is not cached on this node; Put the chain from its first uncached block; nothing was stored");
                    }

                    if (r.Status == PutStatus.ResourceExhausted)
                        throw new StoreFullException($"{r.Detail}; nothing from this Put was stored");
                    if (r.Status == PutStatus.Refused)
                    {
                        notAdmitted += r.NotStored; // the stored prefix stays: a whole, findable chain
                        for (int k = run.Count - r.NotStored; k < run.Count; k++)
                            declined.Add(run[k].Hash);
                    }
                    else
                    {
                        r.ThrowIfIncomplete();
                    }

                    stored += r.Stored;
                    present += r.AlreadyPresent;
                    i = end;
                }

                newlyStored.Clear();
                return new PutOutcome(stored, present, notAdmitted);
            }
            finally
            {
                // An error stores nothing: undo what this call stored, children first. A block another call has built on
                // (it has a cached child), is using meanwhile, or put too (it found it present: it reports it stored)
                // stays: it is theirs now too.
                for (int k = newlyStored.Count - 1; k >= 0; k--)
                {
                    var key = new BlockKey(tenant, newlyStored[k]);
                    await store._tiers.RemoveLeafAsync(tenant, key.Hash, CancellationToken.None, keep: () => SharedWithAnother(key)).ConfigureAwait(false);
                }

                Unclaim();
                Release();
            }
        }

        // Before a run is placed (so before the manager can find any of it present): the run's blocks are this commit's too.
        private void Claim(List<BlockPut> run)
        {
            lock (store._lock)
            {
                foreach (BlockPut b in run)
                {
                    var key = new BlockKey(tenant, b.Hash);
                    store._placing[key] = store._placing.TryGetValue(key, out var c) ? (c.Commits + 1, true) : (1, false);
                    _claimed.Add(key);
                }
            }
        }

        private bool SharedWithAnother(BlockKey key)
        {
            lock (store._lock)
                return store._placing.TryGetValue(key, out var c) && c.Shared;
        }

        private void Unclaim()
        {
            lock (store._lock)
            {
                foreach (BlockKey key in _claimed)
                {
                    var c = store._placing[key];
                    if (c.Commits == 1)
                        store._placing.Remove(key);
                    else
                        store._placing[key] = (c.Commits - 1, c.Shared);
                }
            }

            _claimed.Clear();
        }

        public void Dispose() => Release();

        private void Release()
        {
            if (_done)
                return;
            _done = true;
            foreach (var s in _staged)
            {
                if (s.Buffer is not null)
                    ArrayPool<byte>.Shared.Return(s.Buffer);
            }
            Interlocked.Add(ref store._staged, -_rented);
            _staged.Clear();
        }
    }
}
