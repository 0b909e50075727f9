using System.Diagnostics;
using KvFabric.Memory;
using KvFabric.Memory.Device;

namespace KvFabric.Transfer.Cuda;

/// <summary>A registered device region: the device and the allocation its address range belongs to.</summary>
internal sealed record DeviceRegion(IDeviceMemory Device, DeviceBuffer Buffer);

/// <summary>
/// Moves device memory through the transfer backends, none of which can address a GPU here (no CUDA-aware UCX, no
/// GPUDirect): the initiator stages each device chunk through a bounded pool of page-locked host slots (one
/// cudaMemcpyAsync per chunk on a stream, then one synchronize per post). A WRITE copies device to host before the bytes
/// go out; a READ copies host to device after they arrived and before the post reports them done. The pool is registered
/// with the agent like any host memory, so every backend (TCP, shared memory, UCX) sends from and receives into it.
/// </summary>
internal sealed class DeviceStaging : IDisposable
{
    private readonly HostBlockPool _pool;
    private readonly SemaphoreSlim _free;
    private readonly SemaphoreSlim _renting = new(1, 1);
    private readonly HashSet<IDeviceMemory> _pinnedFor = [];
    private readonly Dictionary<IDeviceMemory, DeviceStream> _streams = [];
    private readonly Lock _lock = new();

    public DeviceStaging(TransferAgent agent, int slotBytes, int slots)
    {
        _pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = slotBytes, SlotCount = slots, Tag = "device-staging" });
        _free = new SemaphoreSlim(slots, slots);
        // Registered so every backend moves from and into it, but the agent's own: never exported, never a peer's target.
        Regions = agent.Register(_pool);
        foreach (var region in Regions)
            region.Internal = true;
    }

    /// <summary>The pool's regions (internal: never exported).</summary>
    public IReadOnlyList<RegisteredRegion> Regions { get; private set; } = [];
    public int Slots => _pool.Capacity;
    public int Available => _pool.Available;

    /// <summary>Page-locks the pool for a device's copies (once per device).</summary>
    public void PinFor(IDeviceMemory device)
    {
        lock (_lock)
        {
            if (_pinnedFor.Contains(device))
                return;
            // Marked pinned only once all of it is (with its stream): a refused pin is undone and tried again by the
            // next registration, not left half done with no stream for the copies to run on.
            int pinned = 0;
            try
            {
                foreach (var region in _pool.Regions)
                {
                    device.PinHost(region.Address, region.Length);
                    pinned++;
                }
                _streams[device] = device.CreateStream();
            }
            catch
            {
                foreach (var region in _pool.Regions.Take(pinned))
                {
                    try
                    {
                        device.UnpinHost(region.Address);
                    }
                    catch (DeviceMemoryException)
                    {
                        // The original failure is the one to report.
                    }
                }
                throw;
            }
            _pinnedFor.Add(device);
        }
    }

    /// <summary>
    /// Before a post: rents a slot per device chunk (waiting up to the deadline while other posts hold them), points
    /// those chunks at their slots, and for a WRITE copies the device bytes in. Returns the rented slots, or null when the
    /// pool stayed busy past the deadline.
    /// </summary>
    public async Task<BlockSlot[]?> StageAsync(TransferRequest request, int[] deviceChunks, DeviceRegion[] regions, CancellationToken ct)
    {
        var slots = new BlockSlot[deviceChunks.Length];
        int rented = 0;
        // One post rents at a time, all of its slots, within one deadline: posts that each took part of the pool would
        // otherwise wait on each other until their deadlines, though one after the other they all fit.
        long start = Stopwatch.GetTimestamp();
        TimeSpan Left() => TimeSpan.FromTicks(Math.Max(0, (request.Options.Deadline - Stopwatch.GetElapsedTime(start)).Ticks));
        if (!await _renting.WaitAsync(Left(), ct).ConfigureAwait(false))
            return null;
        try
        {
            for (; rented < slots.Length; rented++)
            {
                if (!await _free.WaitAsync(Left(), ct).ConfigureAwait(false))
                {
                    Return(slots.AsSpan(0, rented));
                    return null;
                }
                slots[rented] = _pool.Rent();
            }
        }
        catch (OperationCanceledException)
        {
            Return(slots.AsSpan(0, rented));
            throw;
        }
        finally
        {
            _renting.Release();
        }

        var chunks = request.Chunks;
        bool write = request.Op == TransferOp.Write;
        int redirected = 0;
        try
        {
            for (; redirected < deviceChunks.Length; redirected++)
            {
                ref Chunk c = ref chunks[deviceChunks[redirected]];
                if (write)
                    CopyOut(regions[redirected], c.Local, slots[redirected].Address, c.Length);
                c = c with { Local = slots[redirected].Address };
            }
            if (write)
                Synchronize(regions);
        }
        catch
        {
            // A copy the device refused: the request keeps its device addresses (it may be posted again) and the
            // slots go back, or every later post would find the pool smaller.
            for (int k = 0; k < redirected; k++)
                chunks[deviceChunks[k]] = chunks[deviceChunks[k]] with { Local = request.Device!.Value.Addresses[k] };
            if (write)
            {
                try
                {
                    Synchronize(regions); // copies already queued must not land in slots another post rents next
                }
                catch (DeviceMemoryException)
                {
                    // The device is failing: nothing more to wait for.
                }
            }
            Return(slots);
            throw;
        }
        return slots;
    }

    /// <summary>After a post: for a READ, copies each chunk that arrived into device memory; then gives everything back.</summary>
    public void Unstage(TransferRequest request, int[] deviceChunks, DeviceRegion[] regions, nint[] deviceAddresses, BlockSlot[] slots, bool copyIn,
        Func<int, bool> arrived)
    {
        var chunks = request.Chunks;
        try
        {
            if (copyIn)
            {
                for (int k = 0; k < deviceChunks.Length; k++)
                {
                    if (arrived(k))
                        CopyIn(regions[k], slots[k].Address, deviceAddresses[k], chunks[deviceChunks[k]].Length);
                }
                Synchronize(regions);
            }
        }
        finally
        {
            for (int k = 0; k < deviceChunks.Length; k++)
                chunks[deviceChunks[k]] = chunks[deviceChunks[k]] with { Local = deviceAddresses[k] };
            Return(slots);
        }
    }

    private unsafe void CopyOut(DeviceRegion region, nint device, nint host, int length) =>
        region.Device.CopyToHostAsync((void*)host, region.Buffer, device - region.Buffer.Pointer, length, Stream(region.Device));

    private unsafe void CopyIn(DeviceRegion region, nint host, nint device, int length) =>
        region.Device.CopyToDeviceAsync(region.Buffer, device - region.Buffer.Pointer, (void*)host, length, Stream(region.Device));

    private DeviceStream Stream(IDeviceMemory device)
    {
        lock (_lock)
            return _streams[device];
    }

    private void Synchronize(DeviceRegion[] regions)
    {
        IDeviceMemory? last = null;
        foreach (var r in regions)
        {
            if (r.Device == last)
                continue;
            r.Device.SynchronizeStream(Stream(r.Device));
            last = r.Device;
        }
    }

    private void Return(ReadOnlySpan<BlockSlot> slots)
    {
        foreach (var s in slots)
        {
            _pool.Return(s);
            _free.Release();
        }
    }

    public void Dispose()
    {
        lock (_lock)
        {
            foreach (var (device, stream) in _streams)
            {
                try
                {
                    device.DestroyStream(stream);
                    foreach (var region in _pool.Regions)
                        device.UnpinHost(region.Address);
                }
                catch (Exception e) when (e is DeviceMemoryException or ObjectDisposedException)
                {
                    // The device went away first: its pins and streams went with it.
                }
            }
            _streams.Clear();
        }
        _pool.Dispose();
        _free.Dispose();
        _renting.Dispose();
    }
}

/// <summary>
/// The target side's staging for one inbound TCP connection: a page-locked host buffer of one chunk, through which a
/// peer's WRITE reaches a device region (received, verified, then copied to the device before the acknowledgement) and
/// a READ leaves it (copied to host, then sent). One buffer per connection, allocated at its first device frame.
/// </summary>
internal sealed class SessionStaging(int chunkBytes) : IDisposable
{
    private AnonymousMemory? _buffer;
    private readonly Dictionary<IDeviceMemory, DeviceStream> _pinned = [];

    public nint Buffer(IDeviceMemory device)
    {
        _buffer ??= new AnonymousMemory(chunkBytes);
        if (!_pinned.ContainsKey(device))
        {
            // Recorded only once both succeeded, so a refusal is retried whole at the next frame.
            var stream = device.CreateStream();
            try
            {
                device.PinHost(_buffer.Address, _buffer.Length);
            }
            catch
            {
                device.DestroyStream(stream);
                throw;
            }
            _pinned[device] = stream;
        }
        return _buffer.Address;
    }

    public unsafe void ToDevice(DeviceRegion region, ulong offset, nint host, int length)
    {
        var stream = _pinned[region.Device];
        region.Device.CopyToDeviceAsync(region.Buffer, (long)offset, (void*)host, length, stream);
        region.Device.SynchronizeStream(stream);
    }

    public unsafe void ToHost(DeviceRegion region, ulong offset, nint host, int length)
    {
        var stream = _pinned[region.Device];
        region.Device.CopyToHostAsync((void*)host, region.Buffer, (long)offset, length, stream);
        region.Device.SynchronizeStream(stream);
    }

    public void Dispose()
    {
        foreach (var (device, stream) in _pinned)
        {
            try
            {
                device.DestroyStream(stream);
                device.UnpinHost(_buffer!.Address);
            }
            catch (Exception e) when (e is DeviceMemoryException or ObjectDisposedException)
            {
                // The device went away first.
            }
        }
        _pinned.Clear();
        _buffer?.Dispose();
    }
}
