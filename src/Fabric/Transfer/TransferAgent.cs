using System.Threading.Channels;
using KvFabric.Memory;
using KvFabric.Memory.Device;
using KvFabric.Transfer.Cuda;
using KvFabric.Transfer.SharedMemory;
using KvFabric.Transfer.Tcp;
using KvFabric.Transfer.Ucx;

namespace KvFabric.Transfer;

/// <summary>
/// A NIXL-style transfer agent: register memory, export metadata, load peers' metadata, prepare READ/WRITE requests
/// of local descriptors against remote ones, post them asynchronously with a deadline, and receive notifications that
/// arrive only once the data they announce is in place. Backend choice is per request: same host with mappable
/// regions uses shared memory, anything else TCP; either can be forced.
/// </summary>
public sealed partial class TransferAgent : IAsyncDisposable
{
    private readonly LocalRegistry _registry = new();
    private readonly TcpBackend _tcp;
    private readonly ShmBackend _shm;
    private readonly UcxBackend? _ucx;
    private readonly Channel<Notification> _notifications;
    private readonly Dictionary<Guid, RemoteAgent> _remotes = new();
    private readonly Lock _remotesLock = new();
    private DeviceStaging? _staging;
    private readonly Lock _stagingLock = new();
    private long _nextPostId;
    private int _disposed;
    private long _queuedNotificationBytes;
    private readonly NotificationReader _notificationReader;

    public TransferAgent(TransferAgentOptions? options = null)
    {
        Options = options ?? new TransferAgentOptions();
        if (Options.MaxChunkBytes is < AgentMetadata.MinChunkBytes or > AgentMetadata.MaxChunkLimit)
            throw new ArgumentOutOfRangeException(nameof(options), Options.MaxChunkBytes, "MaxChunkBytes must be within 4 KiB..256 MiB");
        if (Options.TcpStreams is < 1 or > TcpPeer.MaxStreams || Options.ShmStreams is < 1 or > TcpPeer.MaxStreams)
            throw new ArgumentOutOfRangeException(nameof(options), $"streams must be within 1..{TcpPeer.MaxStreams}");
        if (Options.StallTimeout <= TimeSpan.Zero || Options.StallTimeout.TotalMilliseconds > int.MaxValue)
            throw new ArgumentOutOfRangeException(nameof(options), Options.StallTimeout, "StallTimeout must be positive and at most int.MaxValue ms");
        if (Options.NotificationQueueBytes < MaxNotificationBytes)
            throw new ArgumentOutOfRangeException(nameof(options), Options.NotificationQueueBytes, $"NotificationQueueBytes must be at least {MaxNotificationBytes} (the largest notification)");
        AgentId = Guid.NewGuid();
        _notifications = Channel.CreateBounded<Notification>(new BoundedChannelOptions(Options.NotificationQueueCapacity)
        {
            SingleWriter = false,
            FullMode = BoundedChannelFullMode.Wait,
        });
        _notificationReader = new NotificationReader(this, _notifications.Reader);
        SharedMemorySegment.RemoveStale();
        _tcp = new TcpBackend(this);
        _shm = new ShmBackend(this);
        if (Options.EnableUcx)
            _ucx = new UcxBackend(this);
    }

    public TransferAgentOptions Options { get; }
    public string Name => Options.Name;
    public Guid AgentId { get; }
    public System.Net.IPEndPoint TcpEndpoint => _tcp.LocalEndPoint;
    public TransferStats Stats { get; } = new();
    /// <summary>Notifications from peers, each delivered after the bytes of its transfer were in place and verified.</summary>
    public ChannelReader<Notification> Notifications => _notificationReader;
    internal LocalRegistry Registry => _registry;
    /// <summary>The regions registered by the user (the agent's own staging memory, and regions being deregistered, are left out).</summary>
    public IReadOnlyList<RegisteredRegion> Regions => Array.FindAll(_registry.All, r => !r.Internal && !r.Closing);
    /// <summary>Whether this agent runs a UCX worker (EnableUcx was set and libucp initialised).</summary>
    public bool UcxAvailable => _ucx?.Available == true;
    /// <summary>Why UCX is not available: not enabled, libucp missing, or its initialisation failed; null when it is.</summary>
    public string? UcxUnavailableReason => _ucx is null ? "TransferAgentOptions.EnableUcx is false" : _ucx.UnavailableReason;

    private RegisteredRegion Added(RegisteredRegion region)
    {
        if (_ucx is not null)
        {
            try
            {
                _ucx.Map(region);
            }
            catch (TransferException)
            {
                _registry.Remove(region);
                throw;
            }
        }
        return region;
    }

    // ---- registration ----

    /// <summary>Registers native memory (anonymous, a shared segment, or a mapped file) for transfers.</summary>
    public RegisteredRegion Register(INativeMemory memory)
    {
        ArgumentNullException.ThrowIfNull(memory);
        if (memory is UcxMemory ucx)
        {
            // AllocateUcx registered it already (with UCX's own mapping): registering is finding that region.
            if (_registry.ById(ucx.Region.Id) == ucx.Region && ucx.Region.Closing)
                throw new TransferException($"{ucx.Region} is being deregistered: retry DeregisterAsync until it returns, then allocate anew");
            return _registry.ById(ucx.Region.Id) == ucx.Region
                ? ucx.Region
                : throw new TransferException($"this UCX allocation belongs to another agent or was freed with its region ({ucx.Region}): allocate it with this agent's AllocateUcx");
        }
        return Added(_registry.Add(memory, memory.Kind, (ulong)memory.Address, (ulong)memory.Length, 0, memory.MappedPath));
    }

    /// <summary>Registers every backing region of a block pool (shared pools become reachable over shared memory).</summary>
    public IReadOnlyList<RegisteredRegion> Register(HostBlockPool pool)
    {
        ArgumentNullException.ThrowIfNull(pool);
        return pool.Regions.Select(Register).ToArray();
    }

    /// <summary>
    /// Allocates host memory through UCX and registers it: on UCX's shared-memory transports (posix, sysv) a peer's
    /// READ or WRITE against it is one copy, where a region allocated elsewhere is served by active messages (two copies
    /// and this agent's progress thread). Freed when the region is deregistered, the memory disposed, or the agent
    /// disposed. Needs EnableUcx.
    /// </summary>
    public UcxMemory AllocateUcx(long length)
    {
        if (length <= 0)
            throw new ArgumentOutOfRangeException(nameof(length), length, "a region needs a positive length in bytes");
        if (_ucx is null || !_ucx.Available)
            throw new TransferException($"AllocateUcx needs a UCX worker ({UcxUnavailableReason}); allocate host memory and Register it instead");
        var (memory, memh, rkey) = _ucx.Allocate(length);
        RegisteredRegion region;
        try
        {
            region = _registry.Add(memory, MemoryKind.Host, (ulong)memory.Address, (ulong)length, 0, null);
        }
        catch
        {
            _ucx.Free(memh);
            throw;
        }
        _ucx.Adopt(region, memh, rkey);
        memory.Region = region;
        memory.Agent = this;
        return memory;
    }

    /// <summary>Registers raw memory the caller owns and keeps alive (private host memory, or device memory).</summary>
    public RegisteredRegion Register(nint address, long length, MemoryKind kind = MemoryKind.Host, int deviceId = 0)
    {
        if (kind == MemoryKind.Device)
            throw new TransferException("register device memory with Register(IDeviceMemory, DeviceBuffer): the agent needs the device to copy through it");
        if (kind is MemoryKind.SharedHost or MemoryKind.File)
            throw new TransferException($"{kind} memory must be registered through its mapping (Register(INativeMemory)) so peers learn its path");
        return Added(_registry.Add(null, kind, (ulong)address, (ulong)length, deviceId, null));
    }

    /// <summary>
    /// Registers device memory (a GPU allocation, or the emulated device's). Transfers of local device descriptors are
    /// staged through page-locked host slots (<see cref="TransferAgentOptions.DeviceStagingSlots"/>); a peer's TCP
    /// READ or WRITE of this region is staged on this side the same way. Shared memory and UCX cannot address it
    /// (no CUDA-aware transport here): peers reach it over TCP.
    /// </summary>
    public RegisteredRegion Register(IDeviceMemory device, DeviceBuffer buffer)
    {
        ArgumentNullException.ThrowIfNull(device);
        if (buffer.Pointer == 0 || buffer.Length <= 0)
            throw new TransferException($"device buffer 0x{buffer.Pointer:x} (+{buffer.Length}) is empty: allocate it from the device first");
        Staging.PinFor(device);
        var region = _registry.Add(null, MemoryKind.Device, (ulong)buffer.Pointer, (ulong)buffer.Length, device.DeviceId, null);
        region.Device = new DeviceRegion(device, buffer);
        // A CUDA-aware UCX maps a real GPU allocation itself: peers then put and get it directly, with no staging.
        return !device.IsEmulated && _ucx is { CudaAware: true } ? Added(region) : region;
    }

    internal DeviceStaging Staging
    {
        get
        {
            lock (_stagingLock)
                return _staging ??= new DeviceStaging(this, Options.MaxChunkBytes, Options.DeviceStagingSlots);
        }
    }

    /// <summary>
    /// Closes a region to new transfers and waits (bounded) for those in flight on it to finish, then forgets it and
    /// unmaps it from UCX. When they do not finish in time it throws <see cref="TimeoutException"/> and changes nothing
    /// else: the region stays registered, closed to new transfers, and mapped, so the caller retries DeregisterAsync
    /// (which waits again) and must not free or reuse the memory until a call returns.
    /// </summary>
    public async Task DeregisterAsync(RegisteredRegion region, TimeSpan? timeout = null)
    {
        ArgumentNullException.ThrowIfNull(region);
        if (!_registry.Contains(region))
            throw new TransferException($"{region} is not registered with this agent");
        await region.CloseAsync(timeout ?? TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        // Nothing uses it any more. Of concurrent (or retried) deregistrations one removes and unmaps it; the others
        // return only once that is done, so none returns while UCX still maps the memory.
        if (!region.TryClaimDeregistration(out var deregistered))
        {
            await deregistered.ConfigureAwait(false);
            return;
        }
        try
        {
            _registry.Remove(region);
            _ucx?.Unmap(region); // its rkey stops working (on RDMA hardware; see docs/transfer.md for emulated transports)
        }
        finally
        {
            region.Deregistered();
        }
    }

    // ---- metadata ----

    /// <summary>This agent's metadata with all regions, or only those given (a peer can only touch what it gets keys for).</summary>
    public AgentMetadata GetMetadata(IEnumerable<RegisteredRegion>? only = null)
    {
        var regions = (only ?? Regions).Select(r =>
        {
            if (_registry.ById(r.Id) != r || r.Internal)
                throw new TransferException($"{r} is not registered with agent '{Name}'");
            if (r.Closing)
                throw new TransferException($"{r} is being deregistered from agent '{Name}': it cannot be exported");
            return new RemoteRegionInfo(r.Id, r.Kind, r.Address, r.Length, r.DeviceId, r.Key, r.MappedPath) { UcxRkey = _ucx?.RkeyOf(r.Id) ?? [] };
        }).ToArray();
        string host = Options.AdvertiseHost ?? TcpEndpoint.Address.ToString();
        return new AgentMetadata(Name, AgentId, HostIdentity.Current, Environment.ProcessId, host, TcpEndpoint.Port,
            Options.MaxChunkBytes, Options.LayoutFingerprint, regions) { UcxWorkerAddress = _ucx?.WorkerAddress ?? ReadOnlyMemory<byte>.Empty };
    }

    public byte[] ExportMetadata(IEnumerable<RegisteredRegion>? only = null) => GetMetadata(only).ToBytes();

    /// <summary>Loads (or reloads) a peer's metadata. A reload replaces the old view and drops its connections.</summary>
    public async Task<RemoteAgent> LoadRemoteAsync(ReadOnlyMemory<byte> metadata)
    {
        var md = AgentMetadata.Parse(metadata.Span);
        if (md.AgentId == AgentId)
            throw new TransferException("this is our own metadata: load the peer's");
        if (!md.LayoutFingerprint.IsEmpty && !Options.LayoutFingerprint.IsEmpty && !md.LayoutFingerprint.Span.SequenceEqual(Options.LayoutFingerprint.Span))
            throw new TransferException($"agent '{md.Name}' uses KV layout {Convert.ToHexStringLower(md.LayoutFingerprint.Span)}, this agent {Convert.ToHexStringLower(Options.LayoutFingerprint.Span)}: both sides must serve the same model layout");
        var remote = new RemoteAgent(md, md.HostId == HostIdentity.Current);
        RemoteAgent? old;
        lock (_remotesLock)
        {
            _remotes.TryGetValue(md.AgentId, out old);
            _remotes[md.AgentId] = remote;
        }
        if (old is not null)
            await ForgetAsync(old).ConfigureAwait(false);
        return remote;
    }

    public async Task UnloadRemoteAsync(RemoteAgent remote)
    {
        ArgumentNullException.ThrowIfNull(remote);
        lock (_remotesLock)
        {
            if (_remotes.TryGetValue(remote.AgentId, out var current) && current == remote)
                _remotes.Remove(remote.AgentId);
        }
        await ForgetAsync(remote).ConfigureAwait(false);
    }

    /// <summary>How long forgetting a peer lets its posts in flight finish before closing its connections (tests shorten it).</summary>
    internal TimeSpan ForgetDrainTimeout { get; set; } = TimeSpan.FromMinutes(2);

    private async Task ForgetAsync(RemoteAgent remote)
    {
        // New posts are refused from here on; those in flight get a bounded grace to finish before their connections
        // close. Memory safety does not rest on this wait (a deadline may be unbounded): shared-memory mappings are
        // reference-counted and unmapped only after the last copy through them.
        await remote.DrainAsync(ForgetDrainTimeout).ConfigureAwait(false);
        await _tcp.ForgetAsync(remote).ConfigureAwait(false);
        await _shm.ForgetAsync(remote).ConfigureAwait(false);
        if (_ucx is not null)
            await _ucx.ForgetAsync(remote).ConfigureAwait(false);
    }

    internal ITransferBackend Backend(BackendKind kind) => kind switch
    {
        BackendKind.SharedMemory => _shm,
        BackendKind.Ucx => _ucx ?? throw new TransferException($"the UCX backend is not enabled in agent '{Name}': set TransferAgentOptions.EnableUcx"),
        _ => _tcp,
    };

    internal UcxBackend? Ucx => _ucx;
    internal ShmBackend Shm => _shm;

    // ---- target-side hooks used by the backends ----

    /// <summary>Queues a notification unless the queue is full by count or by bytes (NotificationQueueBytes); false when refused.</summary>
    internal bool Deliver(Notification n)
    {
        long size = n.Message.Length;
        if (Interlocked.Add(ref _queuedNotificationBytes, size) <= Options.NotificationQueueBytes && _notifications.Writer.TryWrite(n))
            return true;
        Interlocked.Add(ref _queuedNotificationBytes, -size);
        Interlocked.Increment(ref Stats.NotifyRefused);
        return false;
    }

    /// <summary>The queue's reader, giving a notification's bytes back to the budget as it is read.</summary>
    private sealed class NotificationReader(TransferAgent agent, ChannelReader<Notification> inner) : ChannelReader<Notification>
    {
        public override bool TryRead([System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out Notification item)
        {
            if (!inner.TryRead(out item))
                return false;
            Interlocked.Add(ref agent._queuedNotificationBytes, -item.Message.Length);
            return true;
        }

        public override ValueTask<bool> WaitToReadAsync(CancellationToken cancellationToken = default) => inner.WaitToReadAsync(cancellationToken);
        public override Task Completion => inner.Completion;
        public override bool CanCount => inner.CanCount;
        public override int Count => inner.Count;
        public override bool CanPeek => inner.CanPeek;
        public override bool TryPeek([System.Diagnostics.CodeAnalysis.MaybeNullWhen(false)] out Notification item) => inner.TryPeek(out item);
    }
    internal void CountRefused() => Interlocked.Increment(ref Stats.Refused);
    internal void CountMalformed() => Interlocked.Increment(ref Stats.Malformed);

    internal void CountBytes(BackendKind backend, uint bytes, bool received)
    {
        ref long counter = ref backend == BackendKind.Tcp
            ? ref (received ? ref Stats.TcpReceived : ref Stats.TcpSent)
            : ref backend == BackendKind.Ucx
            ? ref (received ? ref Stats.UcxReceived : ref Stats.UcxSent)
            : ref (received ? ref Stats.ShmRead : ref Stats.ShmWritten);
        Interlocked.Add(ref counter, bytes);
    }

    internal ulong NextPostId() => (ulong)Interlocked.Increment(ref _nextPostId);

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        RemoteAgent[] remotes;
        lock (_remotesLock)
        {
            remotes = [.. _remotes.Values];
            _remotes.Clear();
        }
        foreach (var r in remotes)
            await ForgetAsync(r).ConfigureAwait(false);
        await _tcp.DisposeAsync().ConfigureAwait(false);
        await _shm.DisposeAsync().ConfigureAwait(false);
        if (_ucx is not null)
            await _ucx.DisposeAsync().ConfigureAwait(false);
        _staging?.Dispose();
        _notifications.Writer.TryComplete();
    }
}
