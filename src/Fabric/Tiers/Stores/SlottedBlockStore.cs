namespace KvFabric.Tiers.Stores;

// Blocks of one fixed size in numbered slots: the accounting and the key-to-slot map shared by the GPU and host tiers;
// subclasses own the slots and copy bytes in and out. A block becomes visible only after its bytes are in place.
// Reads of a key racing with its Remove are the caller's to prevent (the tier manager never removes a block while a
// read of it is in flight).
public abstract class SlottedBlockStore : IBlockStore, IFixedSizeBlockStore
{
    private readonly Dictionary<BlockKey, int> _slots = [];
    private readonly Lock _lock = new();
    private bool _disposed;

    protected SlottedBlockStore(TierKind kind, int blockBytes, int slotCount)
    {
        if (blockBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(blockBytes), blockBytes, "block size must be positive (a KV layout's BlockBytes)");
        if (slotCount <= 0)
            throw new ArgumentOutOfRangeException(nameof(slotCount), slotCount, $"the {kind} tier needs at least one block slot; leave the tier out instead");
        Kind = kind;
        BlockBytes = blockBytes;
        SlotCount = slotCount;
    }

    public TierKind Kind { get; }
    public int BlockBytes { get; }
    public int SlotCount { get; }
    public long CapacityBytes => (long)BlockBytes * SlotCount;
    public long UsedBytes { get { lock (_lock) return (long)_slots.Count * BlockBytes; } }
    public int Count { get { lock (_lock) return _slots.Count; } }

    public bool Contains(BlockKey key)
    {
        lock (_lock)
            return _slots.ContainsKey(key);
    }

    protected bool TryGetSlot(BlockKey key, out int slot)
    {
        lock (_lock)
            return _slots.TryGetValue(key, out slot);
    }

    public ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
    {
        if (block.Length != BlockBytes)
            throw new ArgumentException($"block {key} has {block.Length} bytes but the {Kind} tier's slots hold exactly {BlockBytes}; check the KV layout", nameof(block));
        int slot;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_slots.ContainsKey(key))
                return ValueTask.FromResult(true); // same hash, same bytes
            if (!TryAcquireSlot(out slot))
                return ValueTask.FromResult(false);
        }
        try
        {
            CopyIn(slot, block.Span);
        }
        catch
        {
            lock (_lock)
                ReleaseSlot(slot);
            throw;
        }
        lock (_lock)
            _slots.Add(key, slot);
        return ValueTask.FromResult(true);
    }

    public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        if (destination.Length < BlockBytes)
            throw new ArgumentException($"destination holds {destination.Length} bytes; block {key} of the {Kind} tier has {BlockBytes}", nameof(destination));
        int slot;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!_slots.TryGetValue(key, out slot))
                return ValueTask.FromResult(false);
        }
        CopyOut(slot, destination.Span[..BlockBytes]);
        return ValueTask.FromResult(true);
    }

    public bool Remove(BlockKey key)
    {
        lock (_lock)
        {
            if (_disposed || !_slots.Remove(key, out int slot))
                return false;
            ReleaseSlot(slot);
            return true;
        }
    }

    // Called under the store's lock.
    protected abstract bool TryAcquireSlot(out int slot);
    protected abstract void ReleaseSlot(int slot);

    // Called outside the lock; the slot is this caller's alone until published or released.
    protected abstract void CopyIn(int slot, ReadOnlySpan<byte> source);
    protected abstract void CopyOut(int slot, Span<byte> destination);

    protected virtual void Dispose(bool disposing) { }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
            _slots.Clear();
        }
        Dispose(true);
        GC.SuppressFinalize(this);
    }
}
