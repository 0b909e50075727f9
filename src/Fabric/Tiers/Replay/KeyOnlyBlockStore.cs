namespace KvFabric.Tiers.Replay;

/// <summary>
/// A store that remembers which blocks it holds but keeps none of their bytes: replays and metadata benchmarks drive the
/// real tier manager (placement, eviction, demotion, promotion) without moving data. Reads succeed for held blocks and
/// leave the destination untouched. Not for serving.
/// </summary>
public sealed class KeyOnlyBlockStore(TierKind kind, long capacityBytes) : IBlockStore
{
    private readonly Dictionary<BlockKey, int> _held = new();
    private long _used;

    public TierKind Kind => kind;
    public long CapacityBytes => capacityBytes;
    public long UsedBytes => _used;
    public int Count => _held.Count;

    public bool Contains(BlockKey key) => _held.ContainsKey(key);

    public ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        if (_held.TryAdd(key, block.Length))
            _used += block.Length;
        return ValueTask.FromResult(true);
    }

    public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default) =>
        ValueTask.FromResult(_held.ContainsKey(key));

    public bool Remove(BlockKey key)
    {
        if (!_held.Remove(key, out int length))
            return false;
        _used -= length;
        return true;
    }

    public void Dispose() => _held.Clear();
}
