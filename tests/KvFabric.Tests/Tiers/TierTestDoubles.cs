using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Tests.Tiers;

// Test double: an LRU eviction policy with a linear victim scan (fine for a few dozen blocks) that also checks the
// tier manager keeps the policy contract (no double admit, no calls on handles that are not resident).
internal sealed class TestLruPolicy : IEvictionPolicy
{
    private readonly Dictionary<int, (long Stamp, bool Evictable, PolicyBlockInfo Info)> _resident = [];
    private long _clock;

    public Func<PolicyBlockInfo, bool>? AdmitWhenFull { get; init; }
    public string Name => "test-lru";
    public int Admitted { get; private set; }
    public int Removed { get; private set; }
    public IReadOnlyDictionary<int, (long Stamp, bool Evictable, PolicyBlockInfo Info)> Resident => _resident;

    public bool ShouldAdmit(in PolicyBlockInfo info) => AdmitWhenFull?.Invoke(info) ?? true;

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        if (!_resident.TryAdd(handle, (++_clock, false, info)))
            throw new InvalidOperationException($"handle {handle} admitted twice");
        Admitted++;
    }

    public void OnAccess(int handle)
    {
        var e = Get(handle);
        _resident[handle] = (++_clock, e.Evictable, e.Info);
    }

    public void OnRemove(int handle)
    {
        if (!_resident.Remove(handle))
            throw new InvalidOperationException($"handle {handle} removed but not resident");
        Removed++;
    }

    public void SetEvictable(int handle, bool evictable)
    {
        var e = Get(handle);
        _resident[handle] = (e.Stamp, evictable, e.Info);
    }

    public bool TryPickVictim(out int handle)
    {
        handle = -1;
        long best = long.MaxValue;
        foreach (var (h, e) in _resident)
        {
            if (e.Evictable && e.Stamp < best)
            {
                best = e.Stamp;
                handle = h;
            }
        }
        return handle >= 0;
    }

    private (long Stamp, bool Evictable, PolicyBlockInfo Info) Get(int handle) =>
        _resident.TryGetValue(handle, out var e) ? e : throw new InvalidOperationException($"handle {handle} is not resident");
}

// Test double standing in for the SSD tier (or any tier): blocks in a dictionary, with fault injection.
internal class InMemoryTestStore : IBlockStore
{
    private readonly Dictionary<BlockKey, byte[]> _blocks = [];
    private readonly Lock _lock = new();

    public InMemoryTestStore(TierKind kind, long capacityBytes)
    {
        Kind = kind;
        CapacityBytes = capacityBytes;
    }

    public TierKind Kind { get; }
    public long CapacityBytes { get; }
    public long UsedBytes { get { lock (_lock) return _blocks.Values.Sum(b => (long)b.Length); } }
    public int Count { get { lock (_lock) return _blocks.Count; } }
    public bool FailWrites { get; set; }
    /// <summary>Writes throw OperationCanceledException (a store giving up on its own token, not the caller's).</summary>
    public bool CancelWrites { get; set; }
    public HashSet<BlockKey> CorruptOnRead { get; } = [];
    public Action<int>? OnRead { get; set; }
    public int Writes { get; private set; }

    public bool Contains(BlockKey key)
    {
        lock (_lock)
            return _blocks.ContainsKey(key);
    }

    public ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        if (FailWrites)
            throw new TierException($"test store ({Kind}): injected write failure (disk full)");
        if (CancelWrites)
            throw new OperationCanceledException($"test store ({Kind}): injected cancellation inside the store");
        lock (_lock)
        {
            if (UsedBytes + block.Length > CapacityBytes)
                return ValueTask.FromResult(false);
            _blocks[key] = block.ToArray();
            Writes++;
            return ValueTask.FromResult(true);
        }
    }

    public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        byte[]? bytes;
        lock (_lock)
        {
            if (!_blocks.TryGetValue(key, out bytes))
                return ValueTask.FromResult(false);
            if (CorruptOnRead.Remove(key))
            {
                _blocks.Remove(key);
                throw new BlockCorruptException(key, Kind, "injected by the test");
            }
        }
        bytes.CopyTo(destination);
        OnRead?.Invoke(bytes.Length);
        return ValueTask.FromResult(true);
    }

    public bool Remove(BlockKey key)
    {
        lock (_lock)
            return _blocks.Remove(key);
    }

    public void Dispose() { }
}

// Test double for a durable tier after a restart: blocks seeded before the manager starts are reported as recovered.
internal sealed class RecoveredTestStore(TierKind kind, long capacityBytes) : InMemoryTestStore(kind, capacityBytes), IDurableBlockStore
{
    private readonly Dictionary<BlockKey, BlockMeta> _recovered = [];

    public IReadOnlyCollection<KeyValuePair<BlockKey, BlockMeta>> Recovered => _recovered;

    public void Seed(BlockKey key, BlockMeta meta, byte[] bytes)
    {
        WriteAsync(key, meta, bytes).AsTask().GetAwaiter().GetResult();
        _recovered[key] = meta;
    }
}

// Test double: a clock the test moves by hand.
internal sealed class ManualTime : TimeProvider
{
    private long _ticks = new DateTimeOffset(2026, 1, 1, 0, 0, 0, TimeSpan.Zero).UtcTicks;

    public override DateTimeOffset GetUtcNow() => new(Interlocked.Read(ref _ticks), TimeSpan.Zero);
    public override long GetTimestamp() => Interlocked.Read(ref _ticks);
    public override long TimestampFrequency => TimeSpan.TicksPerSecond;
    public void Advance(TimeSpan by) => Interlocked.Add(ref _ticks, by.Ticks);
}

// Test double: records every event in order.
internal sealed class RecordingSink : IKvEventSink
{
    public List<KvEvent> Events { get; } = [];

    public void OnEvent(in KvEvent e)
    {
        lock (Events)
            Events.Add(e);
    }
}

internal static class TierTestData
{
    public static BlockHash Hash(int n) => new(0xC0FFEE, (ulong)n);

    public static byte[] Bytes(int n, int length)
    {
        var b = new byte[length];
        for (int i = 0; i < length; i++)
            b[i] = (byte)(n * 31 + i);
        return b;
    }

    // Blocks n0, n0+1, ... as one chain segment.
    public static BlockPut[] Chain(int first, int count, int length) =>
        Enumerable.Range(first, count).Select(n => new BlockPut(Hash(n), Bytes(n, length))).ToArray();

    public static BlockHash[] Hashes(int first, int count) => Enumerable.Range(first, count).Select(Hash).ToArray();
}
