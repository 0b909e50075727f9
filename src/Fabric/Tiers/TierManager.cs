using System.Threading.Channels;
using KvFabric.Blocks;

namespace KvFabric.Tiers;

// One per sidecar: places blocks in an ordered list of tiers (fastest first), moves them between tiers, and publishes
// every placement, move and drop as a KvEvent.
//
// Concurrency (docs/tiers.md): one metadata lock guards every table and every policy call and is never held across
// I/O. Operations that change where blocks live (put, promotion, delete, clear, and the evictions they cause) run one
// at a time under an async "mover" gate, so a move is planned, copied and committed without another move interleaving.
// Lookup, Pin/Unpin, Acquire and Stats take only the metadata lock; Get takes it briefly around each read and marks the
// block in use meanwhile, which keeps it from being evicted; an eviction that finds its victim in use (or pinned) at commit time
// keeps the victim where it was.
public sealed partial class TierManager : IDisposable, IAsyncDisposable
{
    private readonly Lock _lock = new();
    private readonly SemaphoreSlim _mover = new(1, 1);
    private readonly TierState[] _tiers;
    private readonly int _n;
    private readonly TimeProvider _time;
    private readonly IKvEventSink? _events;
    private readonly TierManagerOptions _options;
    private readonly double? _recomputePerBlock;
    private readonly double _recomputePerDepth;
    private readonly Channel<BlockKey>? _promotions;
    private readonly Task _promoter = Task.CompletedTask;
    private readonly CancellationTokenSource _shutdown = new();
    // _shutdown's token, taken once: it stays readable (cancelled) after DisposeAsync disposes the source.
    private readonly CancellationToken _stopping;
    private TaskCompletionSource? _idle;
    private int _pendingPromotions;
    private int _activeReads;
    private TaskCompletionSource? _readsDrained;
    private ulong _sequence;
    private long _misses, _promotionsQueued, _promotionsSkipped, _promotionsFailed;
    private long _now;
    private bool _disposed;

    public TierManager(TierManagerOptions options)
    {
        _stopping = _shutdown.Token;
        ArgumentNullException.ThrowIfNull(options);
        if (options.Tiers is null || options.Tiers.Count == 0)
            throw new ArgumentException("a tier manager needs at least one tier (Gpu, Host or Ssd, fastest first)", nameof(options));
        if (options.PromotionQueueCapacity <= 0)
            throw new ArgumentOutOfRangeException(nameof(options), options.PromotionQueueCapacity, "PromotionQueueCapacity must be positive");
        if (options.BandwidthSmoothing is <= 0 or > 1)
            throw new ArgumentOutOfRangeException(nameof(options), options.BandwidthSmoothing, "BandwidthSmoothing must be in (0, 1]");
        if (options.RecomputeSecondsPerBlock is < 0 || options.RecomputeSecondsPerBlockPerDepth < 0)
            throw new ArgumentOutOfRangeException(nameof(options), "recompute costs cannot be negative");
        _options = options;
        _n = options.Tiers.Count;
        _tiers = new TierState[_n];
        for (int i = 0; i < _n; i++)
            _tiers[i] = CreateTier(i, options.Tiers[i], i > 0 ? options.Tiers[i - 1].Store?.Kind : null);
        Tiers = Array.ConvertAll(_tiers, t => t.Kind);
        _time = options.Time ?? TimeProvider.System;
        _events = options.Events;
        _recomputePerBlock = options.RecomputeSecondsPerBlock;
        _recomputePerDepth = options.RecomputeSecondsPerBlockPerDepth;
        InitBlockTable(1024);
        RecoverDurableTiers();
        if (options.PromoteOnHit && _n > 1)
        {
            _promotions = Channel.CreateBounded<BlockKey>(new BoundedChannelOptions(options.PromotionQueueCapacity)
            {
                SingleReader = true,
                FullMode = BoundedChannelFullMode.Wait,
            });
            _promoter = Task.Run(PromoteLoopAsync);
        }
    }

    private static TierState CreateTier(int index, TierOptions? options, TierKind? previous)
    {
        if (options?.Store is null || options.Policy is null)
            throw new ArgumentException($"tier {index} needs both a Store and a Policy", nameof(options));
        var kind = options.Store.Kind;
        if (!Enum.IsDefined(kind))
            throw new ArgumentException($"tier {index}: the store reports unknown tier kind {(int)kind}; use Gpu, Host or Ssd", nameof(options));
        if (previous is { } p && kind <= p)
            throw new ArgumentException($"tier {index} is {kind} after {p}: list tiers fastest first (Gpu, Host, Ssd), each at most once", nameof(options));
        long capacity = options.CapacityBytes ?? options.Store.CapacityBytes;
        if (capacity <= 0)
            throw new ArgumentOutOfRangeException(nameof(options), capacity, $"the {kind} tier has a capacity of {capacity} bytes; give it a positive capacity or leave it out");
        if (capacity > options.Store.CapacityBytes)
            throw new ArgumentOutOfRangeException(nameof(options), capacity, $"the {kind} tier is configured for {capacity} bytes but its store holds only {options.Store.CapacityBytes}");
        if (options.ReadBandwidthBytesPerSecond <= 0 || options.ReadLatencySeconds < 0)
            throw new ArgumentOutOfRangeException(nameof(options), $"the {kind} tier needs a positive read bandwidth and a non-negative latency for the load-versus-recompute gate");
        if (options.Store.Count != 0 && options.Store is not IDurableBlockStore)
            throw new ArgumentException($"the {kind} store already holds {options.Store.Count} blocks but is not durable, so nothing says how they chain; start the tier manager on an empty store", nameof(options));
        int fixedBytes = options.Store is IFixedSizeBlockStore f ? f.BlockBytes : 0;
        return new TierState(index, options, capacity, fixedBytes, options.ReadLatencySeconds, options.ReadBandwidthBytesPerSecond);
    }

    // Fastest first; bit i of Residency() is Tiers[i].
    public IReadOnlyList<TierKind> Tiers { get; }

    public IBlockStore GetStore(TierKind kind) => _tiers[TierIndex(kind)].Store;

    private int TierIndex(TierKind kind)
    {
        for (int i = 0; i < _n; i++)
        {
            if (_tiers[i].Kind == kind)
                return i;
        }
        throw new ArgumentException($"this tier manager has no {kind} tier; its tiers are {string.Join(", ", Tiers)}", nameof(kind));
    }

    // The longest cached prefix of chain (which starts at the chain's first block), with the tier each block would be
    // read from. tiersOut may be empty; otherwise it must be at least as long as chain. No allocation.
    public LookupResult Lookup(uint tenant, ReadOnlySpan<BlockHash> chain, Span<TierKind> tiersOut = default)
    {
        if (!tiersOut.IsEmpty && tiersOut.Length < chain.Length)
            throw new ArgumentException($"tiersOut holds {tiersOut.Length} entries for a chain of {chain.Length}; pass an empty span or one per block", nameof(tiersOut));
        lock (_lock)
        {
            int matched = 0, served = 0, prev = -1, usedTiers = 0;
            double load = 0, recompute = 0;
            for (int i = 0; i < chain.Length; i++)
            {
                int b = FindInChain(new BlockKey(tenant, chain[i]), prev);
                if (b == None || _held[b] == 0)
                    break;
                int t = Fastest(b);
                if (!tiersOut.IsEmpty)
                    tiersOut[i] = _tiers[t].Kind;
                matched = i + 1;
                prev = b;
                if (_recomputePerBlock is { } perBlock)
                {
                    var tier = _tiers[t];
                    if ((usedTiers & (1 << t)) == 0)
                    {
                        usedTiers |= 1 << t;
                        load += tier.LatencySeconds;
                    }
                    load += _length[b] * tier.SecondsPerByte;
                    recompute += perBlock + _depth[b] * _recomputePerDepth;
                    if (load <= recompute)
                        served = matched;
                }
                else
                {
                    served = matched;
                }
            }
            return new LookupResult(matched, served);
        }
    }

    // Pins the cached blocks of chain for lease (counted: each Pin needs its Unpin, and all of a block's pins lapse when
    // the latest lease expires). Pinned blocks are never evicted. Returns how many blocks were pinned.
    public int Pin(uint tenant, ReadOnlySpan<BlockHash> chain, TimeSpan lease)
    {
        if (lease <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(nameof(lease), lease, "a pin needs a positive lease; unpin with Unpin");
        lock (_lock)
        {
            Tick();
            ExpireLeases(); // retire lapsed entries here too, or a node whose tiers never fill queues one per renewal
            double add = lease.TotalSeconds * _time.TimestampFrequency;
            long until = add >= long.MaxValue - _now ? long.MaxValue : _now + (long)add;
            int pinned = 0;
            foreach (var hash in chain)
            {
                if (!_index.TryGetValue(new BlockKey(tenant, hash), out int b) || _held[b] == 0)
                    continue;
                if (!IsPinned(b))
                    _pins[b] = 0; // an expired lease's count does not carry over
                _pins[b]++;
                if (until > _leaseUntil[b])
                {
                    _leaseUntil[b] = until;
                    _leases.Enqueue(b, until);
                }
                RefreshEvictable(b);
                pinned++;
            }
            return pinned;
        }
    }

    public int Unpin(uint tenant, ReadOnlySpan<BlockHash> chain)
    {
        lock (_lock)
        {
            Tick();
            int unpinned = 0;
            foreach (var hash in chain)
            {
                if (!_index.TryGetValue(new BlockKey(tenant, hash), out int b) || !IsPinned(b))
                    continue;
                if (--_pins[b] == 0)
                    _leaseUntil[b] = 0;
                RefreshEvictable(b);
                unpinned++;
            }
            return unpinned;
        }
    }

    // Marks the cached prefix of chain as in use by a transfer until the scope is disposed: those blocks are not evicted
    // or deleted meanwhile, so a peer may read their bytes in place (see HostBlockStore.TryGetSharedLocation).
    public BlockUseScope Acquire(uint tenant, ReadOnlySpan<BlockHash> chain)
    {
        var ids = new int[chain.Length];
        int count = 0;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            Tick();
            int prev = -1;
            for (int i = 0; i < chain.Length; i++)
            {
                int b = FindInChain(new BlockKey(tenant, chain[i]), prev);
                if (b == None || _held[b] == 0)
                    break;
                AddUse(b);
                ids[count++] = b;
                prev = b;
            }
        }
        return new BlockUseScope(this, ids, count);
    }

    internal static readonly TimeSpan DisposeReadDrainTimeout = TimeSpan.FromSeconds(30);

    internal void Release(ReadOnlySpan<int> ids, bool read)
    {
        lock (_lock)
        {
            Tick();
            foreach (int b in ids)
                DropUse(b);
            if (read && --_activeReads == 0 && _readsDrained is { } drained)
                drained.TrySetResult();
        }
    }

    // Lease expiry entries not yet retired (tests).
    internal int LeaseQueueLength
    {
        get { lock (_lock) return _leases.Count; }
    }

    // Which tiers hold the block (bit i = tier i, fastest first); 0 when it is not cached.
    public int Residency(BlockKey key)
    {
        lock (_lock)
            return _index.TryGetValue(key, out int b) ? _held[b] : 0;
    }

    public TierManagerStats Stats()
    {
        lock (_lock)
        {
            var tiers = new TierStats[_n];
            for (int i = 0; i < _n; i++)
            {
                var t = _tiers[i];
                tiers[i] = new TierStats(t.Kind, t.Policy.Name, t.Capacity, t.Used, t.Reserved, t.Count, t.Hits, t.Evictions,
                    t.DemotionsIn, t.PromotionsIn, t.BytesMovedIn, t.BytesIn, t.BytesOut, t.AdmissionRefusals, t.StoreErrors,
                    1.0 / t.SecondsPerByte, t.LatencySeconds);
            }
            return new TierManagerStats(tiers, _index.Count, _misses, _promotionsQueued, _promotionsSkipped, _promotionsFailed, _sequence);
        }
    }

    // A Stored event for every block in every tier that holds it, stamped with the current sequence number: what an
    // index that saw a gap rebuilds this node's state from. Parents come before children.
    public IReadOnlyList<KvEvent> SnapshotEvents()
    {
        lock (_lock)
        {
            var list = new List<KvEvent>(_index.Count);
            var stack = new Stack<int>();
            foreach (var (_, b) in _index)
            {
                if (_parent[b] < 0)
                    stack.Push(b);
            }
            while (stack.Count > 0)
            {
                int b = stack.Pop();
                for (int t = 0; t < _n; t++)
                {
                    if ((_held[b] & (1 << t)) != 0)
                        list.Add(MakeEvent(_sequence, KvEventKind.Stored, b, t));
                }
                for (int c = _firstChild[b]; c >= 0; c = _nextSibling[c])
                    stack.Push(c);
            }
            return list;
        }
    }

    // Completes when every queued promotion has run (tests and orderly shutdown use it).
    public Task WhenPromotionsIdleAsync()
    {
        lock (_lock)
        {
            // Disposal abandons queued promotions: nothing will run them, so nobody may wait for them.
            if (_pendingPromotions == 0 || _disposed)
                return Task.CompletedTask;
            _idle ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            return _idle.Task;
        }
    }

    // Leases run on the monotonic timestamp, so a wall-clock step neither expires nor extends them.
    private void Tick() => _now = _time.GetTimestamp();

    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    public async ValueTask DisposeAsync()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            _idle?.TrySetResult(); // queued promotions are abandoned (WhenPromotionsIdleAsync)
            _idle = null;
        }
        _promotions?.Writer.TryComplete();
        await _shutdown.CancelAsync().ConfigureAwait(false);
        try
        {
            // Bounded as the move below: a promotion stuck in a store call that ignores the cancellation (a read or
            // write stuck in the kernel) must not hang shutdown; the stores then stay open under it.
            await _promoter.WaitAsync(_options.DisposeMoveTimeout).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            // shutting down: queued promotions are abandoned
        }
        catch (TimeoutException) when (!_promoter.IsCompleted)
        {
            return;
        }
        // Let the running move finish and in-flight reads drain before the stores (and their memory) go away. Later
        // calls find _disposed set and throw ObjectDisposedException. Bounded: a move stuck on a device that no longer
        // answers must not hang shutdown; the stores then stay undisposed (the move still holds them) until the process ends.
        if (!await _mover.WaitAsync(_options.DisposeMoveTimeout).ConfigureAwait(false))
            return;
        try
        {
            Task drained = Task.CompletedTask;
            lock (_lock)
            {
                if (_activeReads > 0)
                    drained = (_readsDrained = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;
            }
            // Bounded: a reader that never lets go (a stuck client holding an in-place lease) must not hang shutdown. Then
            // the stores stay undisposed (their memory leaks until the process ends) rather than freed under a reader.
            bool readersDone = await Task.WhenAny(drained, Task.Delay(DisposeReadDrainTimeout)).ConfigureAwait(false) == drained;
            if (_options.OwnsStores)
            {
                foreach (var t in _tiers)
                {
                    // Only stores read in place can be under a reader; the others (the SSD log's last commit) always close.
                    if (readersDone || t.Store is not IInPlaceBlockStore)
                        t.Store.Dispose();
                }
            }
        }
        finally
        {
            _mover.Release();
        }
        _shutdown.Dispose();
    }
}

// Blocks held in use by a transfer; dispose to release them (idempotent).
public sealed class BlockUseScope : IDisposable
{
    private TierManager? _owner;
    private readonly int[]? _ids;
    private readonly int _single; // the block of a one-block scope (no array: an in-place read opens one per block)
    private readonly bool _read;

    internal BlockUseScope(TierManager owner, int[] ids, int count)
    {
        _owner = owner;
        _ids = ids;
        Count = count;
    }

    // One block, read in place (TryOpenInPlace), which disposing the manager waits for.
    internal BlockUseScope(TierManager owner, int block)
    {
        _owner = owner;
        _single = block;
        Count = 1;
        _read = true;
    }

    // How many leading blocks of the chain are held.
    public int Count { get; }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _owner, null) is { } owner)
            owner.Release(_ids is null ? new ReadOnlySpan<int>(in _single) : _ids.AsSpan(0, Count), _read);
    }
}
