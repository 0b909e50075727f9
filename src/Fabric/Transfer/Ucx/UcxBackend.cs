using System.Buffers.Binary;
using System.Text;
using KvFabric.Memory;
using KvFabric.Transfer.Tcp;

namespace KvFabric.Transfer.Ucx;

/// <summary>
/// Transfers through UCX (libucp): READ is ucp_get_nbx and WRITE ucp_put_nbx per chunk, against the worker address and
/// packed rkeys the peer put in its metadata. UCX picks the transport (verbs where a NIC exists, else TCP or shared
/// memory; UCX_TLS chooses). A WRITE settles its chunks only after ucp_ep_flush_nbx completes, so Done means the bytes
/// are at the target; notifications travel as active messages after that. Before any byte moves, the target confirms
/// (one active-message round trip per post) that every region and key the request uses is still registered.
/// </summary>
internal sealed class UcxBackend : ITransferBackend
{
    private const byte KindNotify = 1, KindCheck = 2, KindVerify = 3, KindDigest = 4;
    private const int VerifyEntryBytes = 32, DigestEntryBytes = 24;
    private readonly TransferAgent _agent;
    private readonly UcxWorker? _worker;
    private readonly Dictionary<uint, (nint Memh, byte[] Rkey)> _mapped = [];
    private readonly List<UcxMemory> _allocations = [];
    private readonly Lock _lock = new();
    private readonly Dictionary<ulong, (TaskCompletionSource<(byte Status, byte[] Payload)> Reply, int Endpoint)> _calls = [];
    private long _nextSeq;

    public UcxBackend(TransferAgent agent)
    {
        _agent = agent;
        _worker = UcxWorker.TryCreate(agent.Name, agent.Options.UcxSettings, out string? why);
        UnavailableReason = why;
        if (_worker is null)
            return;
        _worker.OnRequest = OnRequest;
        _worker.OnReply = OnReply;
        _worker.RefuseRequest = RefuseOversized;
        _worker.OnEndpointError = OnEndpointError;
    }

    public BackendKind Kind => BackendKind.Ucx;
    public bool Available => _worker is not null;
    /// <summary>Why UCX could not be initialised (null when it was).</summary>
    public string? UnavailableReason { get; }
    public ReadOnlyMemory<byte> WorkerAddress => _worker?.Address ?? ReadOnlyMemory<byte>.Empty;

    // ---- local regions ----

    /// <summary>Whether device regions are mapped for UCX directly (a CUDA-aware UCX); otherwise they are staged.</summary>
    public bool CudaAware => _worker?.CudaAware == true;

    public void Map(RegisteredRegion region)
    {
        if (_worker is null)
            return;
        bool device = region.Kind == MemoryKind.Device;
        var (memh, rkey) = _worker.Invoke(() => _worker.MapMemory((nint)region.Address, region.Length, device), TimeSpan.FromSeconds(30));
        lock (_lock)
            _mapped[region.Id] = (memh, rkey);
    }

    /// <summary>Allocates memory through UCX and maps it (see <see cref="UcxMemory"/>); the caller registers it.</summary>
    public (UcxMemory Memory, nint Memh, byte[] Rkey) Allocate(long length)
    {
        if (_worker is null)
            throw new TransferException($"UCX is not available ({UnavailableReason}): allocate host memory yourself and register it");
        var (memh, rkey, address) = _worker.Invoke(() => _worker.AllocateMemory((ulong)length), TimeSpan.FromSeconds(30));
        var memory = new UcxMemory(address, length);
        lock (_lock)
            _allocations.Add(memory);
        return (memory, memh, rkey);
    }

    /// <summary>Records the mapping of a region whose memory <see cref="Allocate"/> gave (no second ucp_mem_map).</summary>
    public void Adopt(RegisteredRegion region, nint memh, byte[] rkey)
    {
        lock (_lock)
            _mapped[region.Id] = (memh, rkey);
    }

    /// <summary>Frees an allocation that never became a region.</summary>
    public void Free(nint memh) => _worker!.Invoke(() =>
    {
        _worker.UnmapMemory(memh);
        return 0;
    }, TimeSpan.FromSeconds(30));

    public void Unmap(RegisteredRegion region)
    {
        if (_worker is null)
            return;
        (nint Memh, byte[] Rkey) m;
        lock (_lock)
        {
            if (!_mapped.Remove(region.Id, out m))
                return;
        }
        if (region.Memory is UcxMemory allocation)
        {
            // Marked before UCX frees it, so Address never hands out unmapped memory.
            allocation.MarkFreed();
            lock (_lock)
                _allocations.Remove(allocation);
        }
        _worker.Invoke(() =>
        {
            _worker.UnmapMemory(m.Memh);
            return 0;
        }, TimeSpan.FromSeconds(30));
    }

    public byte[]? RkeyOf(uint regionId)
    {
        lock (_lock)
            return _mapped.TryGetValue(regionId, out var m) ? m.Rkey : null;
    }

    // ---- reachability ----

    public bool CanReach(RemoteAgent remote, ReadOnlySpan<int> remoteRegions, out string? why)
    {
        if (_worker is null)
        {
            why = $"UCX is not available in this agent: {UnavailableReason ?? "TransferAgentOptions.EnableUcx is false"}";
            return false;
        }
        if (remote.Metadata.UcxWorkerAddress.IsEmpty)
        {
            why = $"agent '{remote.Name}' does not advertise UCX (its metadata has no worker address: it runs without EnableUcx or without libucp)";
            return false;
        }
        foreach (int r in remoteRegions)
        {
            var region = remote.Metadata.Regions[r];
            if (region.Kind == MemoryKind.Device && region.UcxRkey.IsEmpty)
            {
                why = $"remote region {region.Id} is device memory that '{remote.Name}' did not map for UCX (its UCX is not CUDA-aware): reach it over TCP, where its side stages it";
                return false;
            }
            if (region.UcxRkey.IsEmpty)
            {
                why = $"remote region {region.Id} of '{remote.Name}' has no UCX remote key in its metadata";
                return false;
            }
        }
        why = null;
        return true;
    }

    // ---- per-peer state ----

    private sealed class Peer
    {
        public UcxEndpoint? Endpoint;
    }

    private UcxEndpoint Endpoint(RemoteAgent remote)
    {
        var peer = remote.UcxState as Peer;
        if (peer is null)
        {
            var created = new Peer();
            peer = Interlocked.CompareExchange(ref remote.UcxState, created, null) as Peer ?? created;
        }
        var worker = _worker!;
        return worker.Invoke(() =>
        {
            if (peer.Endpoint is { Closed: false, Failure: null } ready)
                return ready;
            if (peer.Endpoint is { } broken)
                worker.Close(broken, TimeSpan.FromSeconds(2));
            var ep = worker.Connect(remote.Metadata.UcxWorkerAddress.Span, remote.Name);
            peer.Endpoint = ep;
            remote.UcxTransports = ep.Transports;
            Interlocked.Increment(ref _agent.Stats.UcxEps);
            if (ep.Transports.Any(t => t.StartsWith("tcp/", StringComparison.Ordinal)))
                Interlocked.Increment(ref _agent.Stats.UcxTcpEps);
            // The transports UCX really chose, logged once per endpoint (KVFABRIC_UCX_LOG=1 adds the full lane table).
            Console.Error.WriteLine($"kvfabric: UCX endpoint {_agent.Name} -> {remote.Name} uses {string.Join(", ", ep.Transports)}"
                + (ep.PeerErrorHandling ? "" : " (no peer-failure handling: process liveness is checked instead)")
                + (Environment.GetEnvironmentVariable("KVFABRIC_UCX_LOG") is "1" ? "\n" + ep.Info : ""));
            return ep;
        }, TimeSpan.FromSeconds(30));
    }

    // ---- request/reply over active messages ----

    private byte[] Header(byte kind, ulong seq)
    {
        byte[] name = Encoding.UTF8.GetBytes(_agent.Name);
        byte[] h = new byte[9 + 16 + 2 + name.Length];
        BinaryPrimitives.WriteUInt64LittleEndian(h, seq);
        h[8] = kind;
        _agent.AgentId.TryWriteBytes(h.AsSpan(9));
        BinaryPrimitives.WriteUInt16LittleEndian(h.AsSpan(25), (ushort)name.Length);
        name.CopyTo(h, 27);
        return h;
    }

    private readonly record struct Reply(WireStatus Status, string? Error, byte[] Payload);

    /// <summary>Sends a request AM and waits for the target's status byte and data (or the endpoint's failure).</summary>
    private async Task<Reply> CallAsync(RemoteAgent remote, UcxEndpoint ep, byte kind, byte[] data, CancellationToken ct)
    {
        ulong seq = (ulong)Interlocked.Increment(ref _nextSeq);
        var tcs = new TaskCompletionSource<(byte Status, byte[] Payload)>(TaskCreationOptions.RunContinuationsAsynchronously);
        lock (_lock)
            _calls[seq] = (tcs, ep.Id);
        byte[] header = Header(kind, seq);
        var worker = _worker!;
        worker.Post(() =>
        {
            if (ep.Failure is { } f)
                Fail(seq, f);
            else
                worker.SendAm(ep, UcxWorker.AmRequest, header, data, new SendFailed(this, seq, ep), 0);
        });
        try
        {
            if (await WatchAsync(tcs.Task, remote, ep, ct).ConfigureAwait(false) is { } died)
                Fail(seq, died);
            var (status, payload) = await tcs.Task.WaitAsync(ct).ConfigureAwait(false);
            return new Reply((WireStatus)status, status == 0 ? null : Describe((WireStatus)status, remote), payload);
        }
        catch (UcxCallFailed e)
        {
            return new Reply(WireStatus.Internal, e.Message, []);
        }
        finally
        {
            lock (_lock)
                _calls.Remove(seq);
        }
    }

    private static string Describe(WireStatus s, RemoteAgent remote) => s switch
    {
        WireStatus.UnknownRegion => $"'{remote.Name}' has no such region any more (it deregistered it): reload its metadata",
        WireStatus.KeyMismatch => $"'{remote.Name}' refused the region key (stale or forged metadata): reload its metadata",
        WireStatus.QueueFull => $"the notification queue of '{remote.Name}' is full (NotificationQueueCapacity messages or NotificationQueueBytes bytes waiting): it is not draining its notifications",
        WireStatus.OutOfRange => $"'{remote.Name}' found a range outside its region: reload its metadata",
        WireStatus.ChecksumUnsupported => $"'{remote.Name}': {FrameHeader.Describe(s)}",
        _ => $"'{remote.Name}' answered {s}",
    };

    private sealed class UcxCallFailed(string message) : Exception(message);

    private sealed class SendFailed(UcxBackend backend, ulong seq, UcxEndpoint ep) : IUcxCompletion
    {
        public void Complete(int tag, int status)
        {
            if (status != 0)
                backend.Fail(seq, ep.Failure ?? $"sending to '{ep.PeerName}' failed: {UcpNative.Describe(status)}");
        }
    }

    private void Fail(ulong seq, string why)
    {
        TaskCompletionSource<(byte, byte[])>? tcs = null;
        lock (_lock)
        {
            if (_calls.TryGetValue(seq, out var c))
                tcs = c.Reply;
        }
        tcs?.TrySetException(new UcxCallFailed(why));
    }

    private void OnReply(ulong seq, byte status, byte[] payload)
    {
        TaskCompletionSource<(byte, byte[])>? tcs = null;
        lock (_lock)
        {
            if (_calls.TryGetValue(seq, out var c))
                tcs = c.Reply;
        }
        tcs?.TrySetResult((status, payload));
    }

    private void OnEndpointError(UcxEndpoint ep, string why)
    {
        List<TaskCompletionSource<(byte, byte[])>> failed = [];
        lock (_lock)
        {
            foreach (var (_, c) in _calls)
            {
                if (c.Endpoint == ep.Id)
                    failed.Add(c.Reply);
            }
        }
        foreach (var t in failed)
            t.TrySetException(new UcxCallFailed(why));
        // In-flight puts and gets complete with an error through their own callbacks (error mode PEER purges them).
    }

    /// <summary>Target side: a notification, a region check, or a checksum request from a peer (progress thread).</summary>
    private (byte Status, byte[]? Payload) OnRequest(ReadOnlyMemory<byte> header, ReadOnlyMemory<byte> data)
    {
        var h = header.Span;
        if (h.Length < 27)
            return ((byte)WireStatus.Malformed, null);
        var from = new Guid(h.Slice(9, 16));
        int nameLen = BinaryPrimitives.ReadUInt16LittleEndian(h[25..]);
        if (h.Length < 27 + nameLen)
            return ((byte)WireStatus.Malformed, null);
        string name = Encoding.UTF8.GetString(h.Slice(27, nameLen));
        switch (h[8])
        {
            case KindNotify:
                return (_agent.Deliver(new Notification(name, from, data.ToArray())) ? (byte)WireStatus.Ok : (byte)WireStatus.QueueFull, null);
            case KindCheck:
                var d = data.Span;
                if (d.Length % 12 != 0)
                    return ((byte)WireStatus.Malformed, null);
                for (int i = 0; i < d.Length; i += 12)
                {
                    var bad = CheckRegion(BinaryPrimitives.ReadUInt32LittleEndian(d[i..]), BinaryPrimitives.ReadUInt64LittleEndian(d[(i + 4)..]), out _);
                    if (bad != WireStatus.Ok)
                        return ((byte)bad, null);
                }
                return ((byte)WireStatus.Ok, null);
            case KindVerify:
            case KindDigest:
                return Checksummed(h[8] == KindVerify, data.Span);
            default:
                _agent.CountMalformed();
                return ((byte)WireStatus.Malformed, null);
        }
    }

    private WireStatus CheckRegion(uint id, ulong key, out RegisteredRegion? region)
    {
        region = _agent.Registry.ById(id);
        // A region being deregistered (its deregistration may have timed out) takes no new transfers.
        if (region is null || region.Internal || region.Closing || RkeyOf(id) is null)
        {
            _agent.CountRefused();
            return WireStatus.UnknownRegion;
        }
        if (region.Key.Value != key)
        {
            _agent.CountRefused();
            return WireStatus.KeyMismatch;
        }
        return WireStatus.Ok;
    }

    /// <summary>
    /// Checksums of ranges of this agent's regions, for a peer's WRITE (verify: compare with the sender's, one status
    /// byte per range) or READ (digest: one checksum per range, which the reader compares with what it got).
    /// Request: [checksum kind] then per range u32 region, u32 length, u64 key, u64 address (+ u64 expected, verify).
    /// </summary>
    private (byte Status, byte[]? Payload) Checksummed(bool verify, ReadOnlySpan<byte> d)
    {
        int entry = verify ? VerifyEntryBytes : DigestEntryBytes;
        if (d.Length < 1 || (d.Length - 1) % entry != 0 || !Enum.IsDefined((ChecksumKind)d[0]) || (ChecksumKind)d[0] == ChecksumKind.None)
        {
            _agent.CountMalformed();
            return ((byte)WireStatus.Malformed, null);
        }
        var kind = (ChecksumKind)d[0];
        if (!Checksums.IsAvailable(kind))
            return ((byte)WireStatus.ChecksumUnsupported, null); // as over TCP (libxxhash missing here)
        int count = (d.Length - 1) / entry;
        byte[] reply = new byte[verify ? count : count * 8];
        for (int i = 0; i < count; i++)
        {
            var e = d.Slice(1 + i * entry, entry);
            uint id = BinaryPrimitives.ReadUInt32LittleEndian(e);
            int length = BinaryPrimitives.ReadInt32LittleEndian(e[4..]);
            ulong key = BinaryPrimitives.ReadUInt64LittleEndian(e[8..]);
            ulong address = BinaryPrimitives.ReadUInt64LittleEndian(e[16..]);
            var bad = CheckRegion(id, key, out var region);
            if (bad != WireStatus.Ok)
                return ((byte)bad, null);
            // Offsets, not ends: address + length can wrap past 2^64 and pass an end comparison.
            if (length <= 0 || address < region!.Address || (ulong)length > region.Length || address - region.Address > region.Length - (ulong)length)
            {
                _agent.CountRefused();
                return ((byte)WireStatus.OutOfRange, null);
            }
            if (region.Kind == MemoryKind.Device)
                return ((byte)WireStatus.ChecksumUnsupported, null); // device bytes are not readable here (the initiator refuses this at Prepare)
            if (!region.TryAcquire())
                return ((byte)WireStatus.UnknownRegion, null);
            ulong sum;
            try
            {
                sum = Checksums.Compute(kind, (nint)address, length);
            }
            finally
            {
                region.Release();
            }
            if (verify)
            {
                bool match = sum == BinaryPrimitives.ReadUInt64LittleEndian(e[24..]);
                reply[i] = (byte)(match ? WireStatus.Ok : WireStatus.ChecksumMismatch);
            }
            else
            {
                // Fault injection (tests): a digest this side sends counts as a payload it sends.
                if (_agent.Options.Faults?.ShouldCorrupt() == true)
                    sum ^= 1;
                BinaryPrimitives.WriteUInt64LittleEndian(reply.AsSpan(i * 8), sum);
            }
        }
        return ((byte)WireStatus.Ok, reply);
    }

    private int _oversizedLogged;

    /// <summary>Target side, before the data is copied: a notification over the limit is refused, counted and (once) logged.</summary>
    private bool RefuseOversized(byte kind, int length)
    {
        if (kind != KindNotify || length <= TransferAgent.MaxNotificationBytes)
            return false;
        Interlocked.Increment(ref _agent.Stats.NotifyRefused);
        _agent.CountMalformed();
        if (Interlocked.Exchange(ref _oversizedLogged, 1) == 0)
            Console.Error.WriteLine($"kvfabric: '{_agent.Name}' refused a {length}-byte UCX notification: over the {TransferAgent.MaxNotificationBytes}-byte limit (counted in RefusedNotifications; logged once)");
        return true;
    }

    public Task<(WireStatus Status, string? Error)> NotifyAsync(RemoteAgent remote, ReadOnlyMemory<byte> message, CancellationToken ct)
    {
        if (message.Length > TransferAgent.MaxNotificationBytes)
            return Task.FromResult((WireStatus.Internal, (string?)$"a {message.Length}-byte notification exceeds the {TransferAgent.MaxNotificationBytes}-byte (1 MiB) limit of notifications: send bulk data as a transfer"));
        return SendNotifyAsync(remote, message, ct);
    }

    /// <summary>Sends a notification without the sender's size check (tests use it to play a peer that ignores the limit).</summary>
    internal async Task<(WireStatus Status, string? Error)> SendNotifyAsync(RemoteAgent remote, ReadOnlyMemory<byte> message, CancellationToken ct)
    {
        UcxEndpoint ep;
        try
        {
            ep = Endpoint(remote);
        }
        catch (TransferException e)
        {
            return (WireStatus.Internal, e.Message);
        }
        var reply = await CallAsync(remote, ep, KindNotify, message.ToArray(), ct).ConfigureAwait(false);
        return (reply.Status, reply.Error);
    }

    // ---- posts ----

    /// <summary>How long an abort waits for the force-closed endpoint's operations to complete (tests shorten it).</summary>
    internal TimeSpan AbortTimeout { get; set; } = TimeSpan.FromSeconds(30);

    /// <summary>
    /// Test hook: when set, every post also counts one operation that only the action handed to the hook completes
    /// (on the progress thread), standing for an operation UCX does not complete even after its endpoint is closed.
    /// </summary>
    internal Action<Action>? HoldOperation;

    private sealed class Post(UcxBackend backend, TransferRequest request, UcxEndpoint ep) : IUcxCompletion
    {
        private const int HeldTag = -2;
        private readonly bool[] _failed = new bool[request.Chunks.Length];
        // With a checksum, chunks that moved are settled only after verification (StartAsync), not here.
        private readonly bool _verify = request.Options.Checksum != ChecksumKind.None;
        /// <summary>Chunks whose put (after the flush) or get completed without error, awaiting verification.</summary>
        public readonly bool[] Moved = new bool[request.Chunks.Length];
        private int _outstanding;
        private bool _issuing;
        public volatile bool Aborting;
        public readonly TaskCompletionSource Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public UcxEndpoint Endpoint => ep;

        public void Issue(UcxWorker worker)
        {
            _issuing = true;
            var chunks = request.Chunks;
            var regions = request.Remote.Metadata.Regions;
            bool write = request.Op == TransferOp.Write;
            for (int i = 0; i < chunks.Length && ep.Failure is null; i++)
            {
                var c = chunks[i];
                var info = regions[c.RemoteRegion];
                nint rkey;
                try
                {
                    rkey = worker.Rkey(ep, c.RemoteRegion, info.UcxRkey.Span);
                }
                catch (TransferException e)
                {
                    _failed[i] = true;
                    request.Settle(i, DescriptorStatus.Refused, $"remote region {info.Id}: {e.Message}");
                    continue;
                }
                _outstanding++;
                if (write)
                    worker.Put(ep, c.Local, c.Length, info.Address + c.RemoteOffset, rkey, this, i);
                else
                    worker.Get(ep, c.Local, c.Length, info.Address + c.RemoteOffset, rkey, this, i);
            }
            if (ep.Failure is { } f)
            {
                for (int i = 0; i < chunks.Length; i++)
                    request.Settle(i, DescriptorStatus.PeerDisconnected, f);
            }
            else if (write)
            {
                _outstanding++;
                worker.Flush(ep, this, -1);
            }
            if (backend.HoldOperation is { } hold)
            {
                _outstanding++;
                hold(() => worker.Post(() => Complete(HeldTag, 0)));
            }
            _issuing = false;
            if (_outstanding == 0)
                Done.TrySetResult();
        }

        public void Complete(int tag, int status)
        {
            _outstanding--;
            if (!Aborting && tag != HeldTag)
            {
                string Why() => ep.Failure ?? $"UCX {(request.Op == TransferOp.Write ? "put" : "get")} to '{ep.PeerName}' failed: {UcpNative.Describe(status)}";
                if (tag >= 0)
                {
                    if (status != 0)
                    {
                        _failed[tag] = true;
                        request.Settle(tag, DescriptorStatus.PeerDisconnected, Why());
                    }
                    else if (request.Op == TransferOp.Read && _verify)
                    {
                        Moved[tag] = true;
                    }
                    else if (request.Op == TransferOp.Read)
                    {
                        backend._agent.CountBytes(BackendKind.Ucx, (uint)request.Chunks[tag].Length, received: true);
                        request.Settle(tag, DescriptorStatus.Done);
                    }
                }
                else
                {
                    // The flush completed: every put issued before it is visible at the target (or failed).
                    for (int i = 0; i < _failed.Length; i++)
                    {
                        if (_failed[i])
                            continue;
                        if (status == 0 && _verify)
                        {
                            Moved[i] = true;
                        }
                        else if (status == 0)
                        {
                            backend._agent.CountBytes(BackendKind.Ucx, (uint)request.Chunks[i].Length, received: false);
                            request.Settle(i, DescriptorStatus.Done);
                        }
                        else
                        {
                            request.Settle(i, DescriptorStatus.PeerDisconnected, ep.Failure ?? $"ucp_ep_flush_nbx to '{ep.PeerName}' failed: {UcpNative.Describe(status)}");
                        }
                    }
                }
            }
            if (_outstanding == 0 && !_issuing)
                Done.TrySetResult();
        }
    }

    public async Task StartAsync(TransferRequest request, CancellationToken ct)
    {
        var remote = request.Remote;
        UcxEndpoint ep;
        try
        {
            ep = Endpoint(remote);
        }
        catch (TransferException e)
        {
            request.SettleAllPending(DescriptorStatus.PeerDisconnected, $"cannot reach '{remote.Name}' over UCX: {e.Message}");
            return;
        }
        // Refuse stale or forged keys before a byte moves: the target checks every (region, key) of the request.
        var pairs = new HashSet<int>();
        foreach (var c in request.Chunks)
            pairs.Add(c.RemoteRegion);
        byte[] check = new byte[pairs.Count * 12];
        int k = 0;
        foreach (int r in pairs)
        {
            var info = remote.Metadata.Regions[r];
            BinaryPrimitives.WriteUInt32LittleEndian(check.AsSpan(k), info.Id);
            BinaryPrimitives.WriteUInt64LittleEndian(check.AsSpan(k + 4), info.Key.Value);
            k += 12;
        }
        var kind = request.Options.Checksum;
        bool read = request.Op == TransferOp.Read;
        // A READ with a checksum asks the target for the checksums of what it will read (in the same round trip as
        // the key check); a WRITE computes its own while the puts go out and has the target verify what landed after
        // the flush.
        byte[]? expected = null;
        Reply verdict;
        try
        {
            if (kind != ChecksumKind.None && read)
            {
                verdict = await CallAsync(remote, ep, KindDigest, ChecksumRequest(request, kind, null), ct).ConfigureAwait(false);
                if (verdict.Status == WireStatus.Ok && verdict.Payload.Length != request.Chunks.Length * 8)
                    verdict = new Reply(WireStatus.Malformed, $"'{remote.Name}' answered {verdict.Payload.Length} bytes of checksums for {request.Chunks.Length} chunks", []);
                expected = verdict.Payload;
            }
            else
            {
                verdict = await CallAsync(remote, ep, KindCheck, check, ct).ConfigureAwait(false);
            }
        }
        catch (OperationCanceledException) when (ct.IsCancellationRequested)
        {
            return;
        }
        if (verdict.Status != WireStatus.Ok)
        {
            var s = verdict.Status is WireStatus.UnknownRegion or WireStatus.KeyMismatch or WireStatus.OutOfRange ? DescriptorStatus.Refused : DescriptorStatus.PeerDisconnected;
            request.SettleAllPending(s, verdict.Error ?? verdict.Status.ToString());
            return;
        }
        var post = new Post(this, request, ep);
        request.BackendState = post;
        Interlocked.MemoryBarrier();
        if (ct.IsCancellationRequested)
        {
            // The deadline passed during the key check: issue nothing. An abort that saw no Post yet returned at once;
            // one that sees this Post waits for Done, which is set here.
            post.Done.TrySetResult();
            return;
        }
        var worker = _worker!;
        worker.Post(() => post.Issue(worker));
        // A WRITE's own checksums are computed here while the progress thread issues the puts (both only read).
        if (kind != ChecksumKind.None && !read)
            expected = LocalChecksums(request, kind, _agent.Options.Faults);
        if (await WatchAsync(post.Done.Task, remote, ep, ct).ConfigureAwait(false) is { } died)
        {
            // The endpoint cannot report the death itself: close it so every in-flight operation completes, with an error.
            worker.Post(() => worker.Close(ep, TimeSpan.FromSeconds(5)));
            _ = died;
        }
        await post.Done.Task.ConfigureAwait(false);
        if (expected is not null && !post.Aborting)
            await VerifyAsync(request, post, ep, expected, ct).ConfigureAwait(false);
    }

    /// <summary>Settles the chunks that moved: Done where the checksums agree, ChecksumMismatch where they do not.</summary>
    private async Task VerifyAsync(TransferRequest request, Post post, UcxEndpoint ep, byte[] expected, CancellationToken ct)
    {
        var chunks = request.Chunks;
        var kind = request.Options.Checksum;
        bool read = request.Op == TransferOp.Read;
        byte[] verdicts;
        if (read)
        {
            // The target's checksums of its ranges against what landed here.
            verdicts = new byte[chunks.Length];
            for (int i = 0; i < chunks.Length; i++)
            {
                if (post.Moved[i])
                    verdicts[i] = Checksums.Compute(kind, chunks[i].Local, chunks[i].Length) == BinaryPrimitives.ReadUInt64LittleEndian(expected.AsSpan(i * 8))
                        ? (byte)WireStatus.Ok : (byte)WireStatus.ChecksumMismatch;
            }
        }
        else
        {
            Reply reply;
            try
            {
                reply = await CallAsync(request.Remote, ep, KindVerify, ChecksumRequest(request, kind, expected), ct).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested)
            {
                return;
            }
            if (reply.Status != WireStatus.Ok || reply.Payload.Length != chunks.Length)
            {
                request.SettleAllPending(DescriptorStatus.PeerDisconnected,
                    $"'{request.Remote.Name}' could not verify the checksums of the WRITE after the flush: {reply.Error ?? $"{reply.Payload.Length} verdicts for {chunks.Length} chunks"}");
                return;
            }
            verdicts = reply.Payload;
        }
        for (int i = 0; i < chunks.Length; i++)
        {
            if (!post.Moved[i])
                continue;
            if (verdicts[i] == (byte)WireStatus.Ok)
            {
                _agent.CountBytes(BackendKind.Ucx, (uint)chunks[i].Length, received: read);
                request.Settle(i, DescriptorStatus.Done);
            }
            else
            {
                request.Settle(i, DescriptorStatus.ChecksumMismatch, FrameHeader.Describe(WireStatus.ChecksumMismatch));
            }
        }
    }

    /// <summary>The sender's checksum of every chunk of a WRITE (fault injection flips the Nth one, as a corrupt payload would).</summary>
    private static byte[] LocalChecksums(TransferRequest request, ChecksumKind kind, TransferFaults? faults)
    {
        var chunks = request.Chunks;
        byte[] sums = new byte[chunks.Length * 8];
        for (int i = 0; i < chunks.Length; i++)
        {
            ulong sum = Checksums.Compute(kind, chunks[i].Local, chunks[i].Length);
            if (faults?.ShouldCorrupt() == true)
                sum ^= 1;
            BinaryPrimitives.WriteUInt64LittleEndian(sums.AsSpan(i * 8), sum);
        }
        return sums;
    }

    /// <summary>A verify (with expected checksums) or digest (without) request over every chunk's remote range.</summary>
    private static byte[] ChecksumRequest(TransferRequest request, ChecksumKind kind, byte[]? expected)
    {
        var chunks = request.Chunks;
        var regions = request.Remote.Metadata.Regions;
        int entry = expected is null ? DigestEntryBytes : VerifyEntryBytes;
        byte[] data = new byte[1 + chunks.Length * entry];
        data[0] = (byte)kind;
        for (int i = 0; i < chunks.Length; i++)
        {
            var c = chunks[i];
            var info = regions[c.RemoteRegion];
            var e = data.AsSpan(1 + i * entry, entry);
            BinaryPrimitives.WriteUInt32LittleEndian(e, info.Id);
            BinaryPrimitives.WriteInt32LittleEndian(e[4..], c.Length);
            BinaryPrimitives.WriteUInt64LittleEndian(e[8..], info.Key.Value);
            BinaryPrimitives.WriteUInt64LittleEndian(e[16..], info.Address + c.RemoteOffset);
            if (expected is not null)
                expected.AsSpan(i * 8, 8).CopyTo(e[24..]);
        }
        return data;
    }

    /// <summary>
    /// Waits for <paramref name="work"/>; where the endpoint has no peer-failure handling and the peer is on this host,
    /// checks every 100 ms that its process is alive, and returns why when it is not (null once the work ended).
    /// </summary>
    private static async Task<string?> WatchAsync(Task work, RemoteAgent remote, UcxEndpoint ep, CancellationToken ct)
    {
        if (ep.PeerErrorHandling || !remote.SameHost)
        {
            await work.WaitAsync(ct).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            return null;
        }
        while (!work.IsCompleted && !ct.IsCancellationRequested)
        {
            await Task.WhenAny(work, Task.Delay(100, CancellationToken.None)).ConfigureAwait(false);
            if (!work.IsCompleted && !ProcessAlive(remote.Metadata.ProcessId))
            {
                string why = $"'{remote.Name}' (pid {remote.Metadata.ProcessId}) exited: its process is gone (detected by the shared-memory liveness check)";
                ep.Failure ??= why;
                return why;
            }
        }
        return null;
    }

    private static bool ProcessAlive(int pid) =>
        KvFabric.Native.Libc.Kill(pid, 0) == 0 || System.Runtime.InteropServices.Marshal.GetLastPInvokeError() == 1; // EPERM: alive, not ours

    /// <summary>
    /// Force-closes the post's endpoint, which completes its in-flight operations, and waits (bounded) for them. When
    /// they do not complete, UCX may still write into (or read) the request's memory: the reason is returned and the
    /// agent quarantines that memory until they do, instead of handing it back.
    /// </summary>
    public async Task<string?> AbortAsync(TransferRequest request)
    {
        if (request.BackendState is not Post post)
            return null;
        post.Aborting = true;
        var worker = _worker!;
        // Forcing the endpoint closed completes every in-flight operation (with an error) so none touches memory after.
        worker.Post(() => worker.Close(post.Endpoint, TimeSpan.FromSeconds(5)));
        try
        {
            await post.Done.Task.WaitAsync(AbortTimeout).ConfigureAwait(false);
            return null;
        }
        catch (TimeoutException)
        {
            string why = $"UCX operations to '{request.Remote.Name}' did not complete {AbortTimeout.TotalSeconds:0.#} s after their endpoint was force-closed, "
                + "so UCX may still write into the request's local memory: it stays quarantined (the request stays posted, its regions stay in use so deregistering them fails, "
                + "its device staging slots are not reused) until UCX completes them; do not reuse or free that memory";
            Console.Error.WriteLine($"kvfabric: {why}");
            return why;
        }
    }

    public ValueTask ForgetAsync(RemoteAgent remote)
    {
        if (Interlocked.Exchange(ref remote.UcxState, null) is Peer { } peer && _worker is { } worker)
        {
            worker.Invoke(() =>
            {
                if (peer.Endpoint is { } ep)
                    worker.Close(ep, TimeSpan.FromSeconds(2));
                return 0;
            }, TimeSpan.FromSeconds(30));
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask DisposeAsync()
    {
        lock (_lock)
        {
            // Every allocation, including one whose region's deregistration timed out (still registered and mapped).
            foreach (var allocation in _allocations)
                allocation.MarkFreed();
            _allocations.Clear();
            // The worker unmaps them all below: a later (retried) DeregisterAsync then finds nothing to unmap here
            // instead of calling into a worker that is gone.
            _mapped.Clear();
        }
        _worker?.Dispose(); // unmaps every memh, which frees UCX allocations
        return ValueTask.CompletedTask;
    }
}
