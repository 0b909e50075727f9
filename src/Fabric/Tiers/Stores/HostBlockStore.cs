using KvFabric.Memory;

namespace KvFabric.Tiers.Stores;

// Where a resident host block's bytes are for a process on this host: map SegmentPath (SharedMemorySegment.Open with
// SegmentLength) and read Length bytes at Offset. Valid while the block is held (TierManager.Acquire).
public readonly record struct SharedBlockLocation(string SegmentPath, long SegmentLength, long Offset, int Length);

// The DRAM tier: one HostBlockPool slot per block. With Shared, the pool lives in /dev/shm segments, so a node-local
// engine can read a block in place instead of receiving a copy.
public sealed class HostBlockStore : SlottedBlockStore, IInPlaceBlockStore
{
    private readonly HostBlockPool _pool;
    private readonly NativeMemoryManager?[] _inPlace;

    public HostBlockStore(int blockBytes, int slotCount, bool shared = false, bool lockInRam = false)
        : base(TierKind.Host, blockBytes, slotCount)
    {
        _pool = new HostBlockPool(new HostBlockPoolOptions
        {
            SlotBytes = blockBytes,
            SlotCount = slotCount,
            Shared = shared,
            LockInRam = lockInRam,
            Tag = "host-tier",
        });
        _inPlace = new NativeMemoryManager?[slotCount];
    }

    public bool TryGetBytes(BlockKey key, out ReadOnlyMemory<byte> bytes)
    {
        bytes = default;
        if (!TryGetSlot(key, out int index))
            return false;
        NativeMemoryManager? view = Volatile.Read(ref _inPlace[index]);
        if (view is null)
        {
            var slot = _pool.SlotAt(index);
            view = Interlocked.CompareExchange(ref _inPlace[index], new NativeMemoryManager(slot.Address, slot.Length), null) ?? _inPlace[index]!;
        }

        bytes = view.Memory;
        return true;
    }

    public bool IsShared => _pool.Regions.Count > 0 && _pool.Regions[0].MappedPath is not null;

    public bool TryGetSharedLocation(BlockKey key, out SharedBlockLocation location)
    {
        location = default;
        if (!IsShared || !TryGetSlot(key, out int index))
            return false;
        var slot = _pool.SlotAt(index);
        foreach (var region in _pool.Regions)
        {
            if (slot.Address >= region.Address && slot.Address < region.Address + (nint)region.Length)
            {
                location = new SharedBlockLocation(region.MappedPath!, region.Length, slot.Address - region.Address, slot.Length);
                return true;
            }
        }
        return false;
    }

    protected override bool TryAcquireSlot(out int slot)
    {
        bool ok = _pool.TryRent(out var s);
        slot = s.Index;
        return ok;
    }

    protected override void ReleaseSlot(int slot) => _pool.Return(_pool.SlotAt(slot));

    protected override void CopyIn(int slot, ReadOnlySpan<byte> source) => source.CopyTo(_pool.SlotAt(slot).AsSpan());

    protected override void CopyOut(int slot, Span<byte> destination) => _pool.SlotAt(slot).AsSpan().CopyTo(destination);

    public override string ToString() => $"host tier: {SlotCount} slots of {BlockBytes} bytes{(IsShared ? " in /dev/shm" : "")}";

    protected override void Dispose(bool disposing) => _pool.Dispose();
}
