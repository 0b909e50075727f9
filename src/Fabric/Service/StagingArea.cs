using System.Diagnostics;
using KvFabric.Memory;

namespace KvFabric.Service;

public readonly record struct StagingSlot(int Index, string Path, long Offset, int Length);

/// <summary>
/// Shared-memory slots a node-local client reserves to hand block bytes to the sidecar (Put) or take them (Get) without
/// sending them through gRPC. Bounded: a fixed pool; reservations end on Release or when their lease expires (a slot in
/// use by a running call is reclaimed only after that call finished with it).
/// </summary>
public sealed class StagingArea : IDisposable
{
    private readonly HostBlockPool _pool;
    private readonly NativeMemoryManager[] _memory;
    private readonly Dictionary<ulong, Reservation> _reservations = new();
    private readonly Lock _lock = new();
    private readonly Timer _timer;
    private ulong _next;
    private int _busy; // slot scopes not yet disposed: calls still reading or writing slot memory

    // Leases end on the monotonic clock (a stepped wall clock must not end them early or keep them); the wall-clock
    // time is only what the client is told.
    internal sealed class Reservation(uint tenant, BlockSlot[] slots, TimeSpan lease)
    {
        public readonly uint Tenant = tenant;
        public readonly BlockSlot[] Slots = slots;
        public readonly DateTimeOffset Expires = DateTimeOffset.UtcNow + lease;
        public readonly long Deadline = Stopwatch.GetTimestamp() + (long)(lease.TotalSeconds * Stopwatch.Frequency);
        public int Busy;
        public bool Ended;
    }

    private readonly Dictionary<uint, int> _held = new(); // slots each tenant holds (until they are back in the pool)

    /// <param name="perTenant">Slots one tenant may hold at once (reservations and exports on its behalf); at most
    /// <paramref name="slots"/>, which is the default: no tenant limit.</param>
    public StagingArea(int slotBytes, int slots, int? perTenant = null)
    {
        PerTenant = perTenant ?? slots;
        if (PerTenant < 1 || PerTenant > slots)
            throw new ArgumentOutOfRangeException(nameof(perTenant), perTenant, $"staging_slots_per_tenant must be 1..staging_slots ({slots})");
        _pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = slotBytes, SlotCount = slots, Shared = true, Tag = "staging" });
        _memory = new NativeMemoryManager[_pool.Capacity];
        for (int i = 0; i < _memory.Length; i++)
            _memory[i] = new NativeMemoryManager(_pool.SlotAt(i).Address, slotBytes);
        _timer = new Timer(_ => Expire(), null, TimeSpan.FromSeconds(1), TimeSpan.FromSeconds(1));
    }

    /// <summary>The slots' memory, to register with the transfer agent (peers READ exports from it; fetches land in it).</summary>
    public HostBlockPool Pool => _pool;
    public int SlotBytes => _pool.SlotBytes;
    public int Capacity => _pool.Capacity;
    public int Available => _pool.Available;
    public int PerTenant { get; }

    /// <summary>Slots the tenant holds now.</summary>
    public int HeldBy(uint tenant)
    {
        lock (_lock)
            return _held.GetValueOrDefault(tenant);
    }

    public (ulong Id, StagingSlot[] Slots, DateTimeOffset Expires) Reserve(uint tenant, int count, TimeSpan lease)
    {
        lock (_lock)
        {
            if (count > _pool.Available)
            {
                throw new StoreFullException(
                    $"only {_pool.Available} of {_pool.Capacity} staging slots are free, {count} were asked for; release reservations or stream the bytes in the call");
            }

            int held = _held.GetValueOrDefault(tenant);
            if (held + count > PerTenant)
            {
                throw new StoreFullException(
                    $"this tenant holds {held} staging slots and asked for {count} more; one tenant may hold {PerTenant} of the node's {_pool.Capacity} "
                    + "(staging_slots_per_tenant): release reservations or stream the bytes in the call");
            }

            var slots = new BlockSlot[count];
            for (int i = 0; i < count; i++)
                slots[i] = _pool.Rent();
            _held[tenant] = held + count;
            ulong id = ++_next;
            var r = new Reservation(tenant, slots, lease);
            _reservations[id] = r;
            var described = new StagingSlot[count];
            for (int i = 0; i < count; i++)
            {
                var (path, offset) = _pool.LocationOf(slots[i].Index);
                described[i] = new StagingSlot(i, path!, offset, _pool.SlotBytes);
            }

            return (id, described, r.Expires);
        }
    }

    public bool Release(uint tenant, ulong id)
    {
        lock (_lock)
        {
            if (!_reservations.TryGetValue(id, out Reservation? r) || r.Tenant != tenant)
                return false;
            End(id, r);
            return true;
        }
    }

    /// <summary>Uses slots of a reservation for the duration of one call (dispose the scope when done).</summary>
    public SlotScope Use(uint tenant, ulong id)
    {
        lock (_lock)
        {
            if (!_reservations.TryGetValue(id, out Reservation? r) || r.Tenant != tenant || r.Ended)
                throw new BlockNotFoundException($"reservation {id} does not exist (it was released, it expired, or it belongs to another tenant); call Reserve again");
            r.Busy++;
            _busy++;
            return new SlotScope(this, id, r);
        }
    }

    public sealed class SlotScope : IDisposable
    {
        private readonly StagingArea _area;
        private readonly ulong _id;
        private readonly Reservation _r;
        private int _done;

        internal SlotScope(StagingArea area, ulong id, Reservation r)
        {
            _area = area;
            _id = id;
            _r = r;
        }

        public int Count => _r.Slots.Length;

        public Memory<byte> Slot(uint index)
        {
            if (index >= (uint)_r.Slots.Length)
                throw new ArgumentOutOfRangeException(nameof(index), index, $"reservation {_id} has slots 0..{_r.Slots.Length - 1}");
            return _area._memory[_r.Slots[index].Index].Memory;
        }

        /// <summary>Where slot index lives in memory (inside Pool's regions), for transfer descriptors.</summary>
        public nint Address(uint index)
        {
            if (index >= (uint)_r.Slots.Length)
                throw new ArgumentOutOfRangeException(nameof(index), index, $"reservation {_id} has slots 0..{_r.Slots.Length - 1}");
            return _r.Slots[index].Address;
        }

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _done, 1) != 0)
                return;
            lock (_area._lock)
            {
                _r.Busy--;
                _area._busy--;
                if (_r.Ended && _r.Busy == 0)
                    _area.ReturnSlots(_r);
            }
        }
    }

    private void End(ulong id, Reservation r)
    {
        _reservations.Remove(id);
        r.Ended = true;
        if (r.Busy == 0)
            ReturnSlots(r);
    }

    private void ReturnSlots(Reservation r)
    {
        foreach (BlockSlot s in r.Slots)
            _pool.Return(s);
        int left = _held[r.Tenant] - r.Slots.Length;
        if (left == 0)
            _held.Remove(r.Tenant);
        else
            _held[r.Tenant] = left;
    }

    private void Expire()
    {
        long now = Stopwatch.GetTimestamp();
        lock (_lock)
        {
            foreach (var (id, r) in _reservations.Where(kv => kv.Value.Deadline <= now).ToList())
                End(id, r);
        }
    }

    /// <summary>How long disposal waits for calls still using slots (a fetch storing from them, an export being copied).</summary>
    internal TimeSpan DisposeWait { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>True when disposal gave up waiting for a call still using slots and left the memory mapped.</summary>
    public bool LeftMapped { get; private set; }

    /// <summary>
    /// Unmaps the slots once no call uses them any more (a fetch that outlived the server's stop may still be storing
    /// blocks from them). After <see cref="DisposeWait"/> it gives up and leaves the memory mapped: a leak in a process
    /// that is stopping, instead of a call touching unmapped memory.
    /// </summary>
    public void Dispose()
    {
        _timer.Dispose();
        var waited = Stopwatch.StartNew();
        while (Busy() > 0)
        {
            if (waited.Elapsed >= DisposeWait)
            {
                LeftMapped = true;
                return;
            }

            Thread.Sleep(10);
        }

        _pool.Dispose();
    }

    private int Busy()
    {
        lock (_lock)
            return _busy;
    }
}
