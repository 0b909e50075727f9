using System.Diagnostics.CodeAnalysis;

namespace KvFabric.Memory;

public sealed record HostBlockPoolOptions
{
    /// <summary>Bytes of one block slot (a KV block's <c>BlockBytes</c>).</summary>
    public required int SlotBytes { get; init; }
    public required int SlotCount { get; init; }
    /// <summary>Slot alignment; 4096 keeps every slot page-aligned for DMA and O_DIRECT.</summary>
    public int Alignment { get; init; } = 4096;
    /// <summary>Upper bound of one backing region; a pool larger than this spans several regions.</summary>
    public long MaxRegionBytes { get; init; } = 1L << 30;
    /// <summary>Back the pool with /dev/shm segments so a local peer process can map the slots.</summary>
    public bool Shared { get; init; }
    public bool LockInRam { get; init; }
    public string Tag { get; init; } = "pool";
    /// <summary>
    /// Allocates each backing region instead (bytes in, page-aligned memory out), e.g. <c>TransferAgent.AllocateUcx</c>;
    /// the pool disposes what is IDisposable when it is disposed, fails to build, or cannot use what it got (disposing
    /// UCX's memory deregisters its region); memory that is not is left to its owner. Excludes
    /// <see cref="Shared"/> and <see cref="LockInRam"/>.
    /// </summary>
    public Func<long, INativeMemory>? Allocator { get; init; }
}

/// <summary>A fixed-size slot of a <see cref="HostBlockPool"/>: the index identifies it, the address is stable.</summary>
public readonly record struct BlockSlot(int Index, nint Address, int Length)
{
    public unsafe Span<byte> AsSpan() => new((void*)Address, Length);
}

/// <summary>
/// Fixed-size, aligned block slots carved out of a few large native regions, allocated once. Rent and Return take a
/// short lock over an index stack: no allocation, no GC pressure. A double return or a foreign slot is refused.
/// </summary>
public sealed class HostBlockPool : IDisposable
{
    private readonly INativeMemory[] _regions;
    private readonly int _slotsPerRegion;
    private readonly long _stride;
    private readonly int[] _free;
    private readonly ulong[] _rented;
    private readonly Lock _lock = new();
    private int _freeCount;
    private int _highWater;
    private bool _disposed;

    public int SlotBytes { get; }
    public int Capacity { get; }
    public int InUse { get { lock (_lock) return Capacity - _freeCount; } }
    public int Available { get { lock (_lock) return _freeCount; } }
    public int HighWater { get { lock (_lock) return _highWater; } }
    public IReadOnlyList<INativeMemory> Regions => _regions;

    public HostBlockPool(HostBlockPoolOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.SlotBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(options), options.SlotBytes, "SlotBytes must be positive");
        if (options.SlotCount <= 0)
            throw new ArgumentOutOfRangeException(nameof(options), options.SlotCount, "SlotCount must be positive");
        if (options.Alignment < 64 || !int.IsPow2(options.Alignment))
            throw new ArgumentOutOfRangeException(nameof(options), options.Alignment, "Alignment must be a power of two of at least 64");
        if (options.Allocator is not null && (options.Shared || options.LockInRam))
            throw new ArgumentException("a pool with its own Allocator cannot also ask for Shared or LockInRam memory: the allocator decides", nameof(options));
        SlotBytes = options.SlotBytes;
        Capacity = options.SlotCount;
        _stride = (options.SlotBytes + (long)options.Alignment - 1) & ~((long)options.Alignment - 1);
        if (_stride > options.MaxRegionBytes)
            throw new ArgumentOutOfRangeException(nameof(options), options.MaxRegionBytes, $"MaxRegionBytes must hold at least one {_stride}-byte slot");
        _slotsPerRegion = (int)Math.Min(options.SlotCount, options.MaxRegionBytes / _stride);
        int regionCount = (options.SlotCount + _slotsPerRegion - 1) / _slotsPerRegion;
        _regions = new INativeMemory[regionCount];
        try
        {
            for (int r = 0; r < regionCount; r++)
            {
                int slots = Math.Min(_slotsPerRegion, options.SlotCount - r * _slotsPerRegion);
                long bytes = slots * _stride;
                _regions[r] = options.Allocator is { } allocate
                    ? Aligned(allocate(bytes), bytes, options.Alignment)
                    : options.Shared
                        ? SharedMemorySegment.Create(bytes, options.Tag, options.LockInRam)
                        : new AnonymousMemory(bytes, options.LockInRam);
            }
        }
        catch
        {
            DisposeRegions();
            throw;
        }
        _free = new int[Capacity];
        for (int i = 0; i < Capacity; i++)
            _free[i] = Capacity - 1 - i; // slot 0 rented first: low addresses stay hot
        _freeCount = Capacity;
        _rented = new ulong[(Capacity + 63) / 64];
    }

    // Allocator memory the pool cannot use is given back (disposed, when it can be) before the error.
    private static INativeMemory Aligned(INativeMemory memory, long bytes, int alignment)
    {
        if (memory.Length < bytes || (memory.Address & (alignment - 1)) != 0)
        {
            string got = $"{memory.Length} bytes at 0x{memory.Address:x}";
            (memory as IDisposable)?.Dispose();
            throw new ArgumentException($"the pool's Allocator returned {got}; the pool needs {bytes} bytes aligned to {alignment}");
        }
        return memory;
    }

    public bool TryRent(out BlockSlot slot)
    {
        int index;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (_freeCount == 0)
            {
                slot = default;
                return false;
            }
            index = _free[--_freeCount];
            _rented[index >> 6] |= 1UL << (index & 63);
            int inUse = Capacity - _freeCount;
            if (inUse > _highWater)
                _highWater = inUse;
        }
        slot = SlotAt(index);
        return true;
    }

    public BlockSlot Rent()
    {
        if (!TryRent(out var slot))
            ThrowExhausted();
        return slot;
    }

    public void Return(BlockSlot slot)
    {
        if ((uint)slot.Index >= (uint)Capacity || SlotAt(slot.Index).Address != slot.Address)
            throw new ArgumentException($"slot {slot.Index} at 0x{slot.Address:x} does not belong to this pool", nameof(slot));
        lock (_lock)
        {
            ulong bit = 1UL << (slot.Index & 63);
            if ((_rented[slot.Index >> 6] & bit) == 0)
                throw new InvalidOperationException($"slot {slot.Index} was returned twice (or never rented)");
            _rented[slot.Index >> 6] &= ~bit;
            _free[_freeCount++] = slot.Index;
        }
    }

    public BlockSlot SlotAt(int index)
    {
        if ((uint)index >= (uint)Capacity)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"this pool has {Capacity} slots");
        var region = _regions[index / _slotsPerRegion];
        return new BlockSlot(index, region.Address + (nint)((index % _slotsPerRegion) * _stride), SlotBytes);
    }

    /// <summary>Where another local process finds a slot: the region's mapped file (null for a private pool) and the offset in it.</summary>
    public (string? Path, long Offset) LocationOf(int index)
    {
        if ((uint)index >= (uint)Capacity)
            throw new ArgumentOutOfRangeException(nameof(index), index, $"this pool has {Capacity} slots");
        var region = _regions[index / _slotsPerRegion];
        return (region.MappedPath, (long)(index % _slotsPerRegion) * _stride);
    }

    [DoesNotReturn]
    private void ThrowExhausted() =>
        throw new InvalidOperationException($"host block pool exhausted: all {Capacity} slots of {SlotBytes} bytes are rented; return slots or size the pool larger");

    private void DisposeRegions()
    {
        foreach (var r in _regions)
            (r as IDisposable)?.Dispose();
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_disposed)
                return;
            _disposed = true;
        }
        DisposeRegions();
    }
}
