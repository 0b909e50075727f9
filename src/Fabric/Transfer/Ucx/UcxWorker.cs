using System.Collections.Concurrent;
using System.Diagnostics;
using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using System.Text.RegularExpressions;

namespace KvFabric.Transfer.Ucx;

/// <summary>Completion of UCX operations started on the progress thread (tag identifies the operation to its owner).</summary>
internal interface IUcxCompletion
{
    /// <summary>Called on the progress thread once per operation, with a UCS status (0 = ok).</summary>
    void Complete(int tag, int status);
}

/// <summary>One connection to a peer worker: the UCP endpoint, the rkeys unpacked for it, and why it failed, if it did.</summary>
internal sealed class UcxEndpoint(int id, string peerName)
{
    public readonly int Id = id;
    public readonly string PeerName = peerName;
    public nint Handle;
    public volatile string? Failure;
    public readonly Dictionary<int, nint> Rkeys = [];
    public IReadOnlyList<string> Transports { get; set; } = [];
    public string Info { get; set; } = "";
    /// <summary>Whether UCX reports this peer's failure (error mode PEER); false where the transports cannot (shared memory in 1.13).</summary>
    public bool PeerErrorHandling { get; set; } = true;
    public bool Closed;
}

/// <summary>
/// One UCP context and worker with its progress thread. Every UCP call runs on that thread (the worker is created in
/// UCS_THREAD_MODE_SINGLE): other threads hand it commands through a queue and wake it. Completions arrive through
/// [UnmanagedCallersOnly] callbacks whose user data is (worker id, slot), so no delegate or GCHandle is allocated per
/// operation; slots are pooled.
/// </summary>
internal sealed unsafe partial class UcxWorker : IDisposable
{
    public const uint AmRequest = 1, AmReply = 2;
    private const int StatusUnreachable = -6; // UCS_ERR_UNREACHABLE

    private static readonly UcxWorker?[] Workers = new UcxWorker?[4096];
    private static int s_nextWorker;

    private readonly int _id;
    private readonly nint _context;
    private readonly nint _worker;
    private readonly Thread _thread;
    private readonly ConcurrentQueue<Action> _commands = new();
    private readonly AutoResetEvent _wake = new(false);
    private volatile bool _stop;
    // Operation slots: touched only on the progress thread.
    private IUcxCompletion?[] _owners = new IUcxCompletion?[1024];
    private int[] _tags = new int[1024];
    private readonly Stack<int> _free = new();
    private int _inUse;
    private readonly List<UcxEndpoint?> _endpoints = [];
    private readonly List<(nint Ep, nint Buffer, int PayloadLength)> _replies = [];
    private readonly List<nint> _memhs = [];

    /// <summary>Handles an inbound request AM (header, data) and returns the status byte, and optional data, sent back.</summary>
    public Func<ReadOnlyMemory<byte>, ReadOnlyMemory<byte>, (byte Status, byte[]? Payload)>? OnRequest { get; set; }
    /// <summary>
    /// Checked before a request AM's data is copied (kind byte, data length): true refuses it with Malformed, unread,
    /// so an oversized message is never buffered.
    /// </summary>
    public Func<byte, int, bool>? RefuseRequest { get; set; }
    /// <summary>Handles a reply AM (sequence, status, data).</summary>
    public Action<ulong, byte, byte[]>? OnReply { get; set; }
    /// <summary>Called (on the progress thread) when an endpoint fails.</summary>
    public Action<UcxEndpoint, string>? OnEndpointError { get; set; }

    public byte[] Address { get; }
    public string Name { get; }
    /// <summary>Whether this UCX build handles CUDA memory (ucp_context_query lists UCS_MEMORY_TYPE_CUDA).</summary>
    public bool CudaAware { get; private init; }
    public int PendingOperations => Volatile.Read(ref _inUse);

    private UcxWorker(string name, nint context, nint worker, byte[] address, int id)
    {
        Name = name;
        _context = context;
        _worker = worker;
        Address = address;
        _id = id;
        for (int i = _owners.Length - 1; i >= 0; i--)
            _free.Push(i);
        _thread = new Thread(Loop) { IsBackground = true, Name = $"kvf-ucx {name}" };
    }

    /// <summary>
    /// UCX's memory hooks (libucm) patch mmap/munmap/malloc in the running process, by relocation or by rewriting the
    /// functions' first instructions, so its registration cache hears of unmapped memory. In a .NET process other threads
    /// (the GC's among them) call those functions while they are being patched: the peer processes of the tests crashed
    /// with SIGSEGV at UCX start-up now and then under load. KvFabric maps its regions once and unmaps them itself, so it
    /// needs no hooks: they are turned off before libucm is loaded, unless the operator set these variables.
    /// </summary>
    private static void DisableMemoryHooks()
    {
        foreach (var (key, value) in new[] { ("UCX_MEM_MMAP_HOOK_MODE", "none"), ("UCX_MEM_MALLOC_HOOKS", "no"), ("UCX_MEM_EVENTS", "no") })
        {
            if (Environment.GetEnvironmentVariable(key) is null)
                Native.Libc.SetEnv(key, value, overwrite: 0);
        }
    }

    /// <summary>Creates a context and a worker, or returns null with the reason (libucp missing, init failed).</summary>
    public static UcxWorker? TryCreate(string name, IReadOnlyDictionary<string, string>? settings, out string? why)
    {
        DisableMemoryHooks();
        try
        {
            return Create(name, settings, out why);
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException or BadImageFormatException)
        {
            why = $"libucp.so.0 (UCX 1.13+) could not be loaded ({e.GetType().Name}: {e.Message}); install libucx0 (scripts/install-prereqs.sh)";
            return null;
        }
    }

    private static UcxWorker? Create(string name, IReadOnlyDictionary<string, string>? settings, out string? why)
    {
        int st = UcpNative.ConfigRead(null, null, out nint config);
        if (st != Ucp.StatusOk)
        {
            why = $"ucp_config_read failed: {UcpNative.Describe(st)}; check the UCX_* environment variables";
            return null;
        }
        foreach (var (key, value) in settings ?? new Dictionary<string, string>())
        {
            st = UcpNative.ConfigModify(config, key, value);
            if (st != Ucp.StatusOk)
            {
                UcpNative.ConfigRelease(config);
                why = $"UCX setting {key}={value} was refused by ucp_config_modify: {UcpNative.Describe(st)}; use names without the UCX_ prefix (TLS, NET_DEVICES, ...)";
                return null;
            }
        }
        nint namePtr = Marshal.StringToCoTaskMemUTF8(name);
        nint context = 0, worker = 0;
        try
        {
            var p = new UcpParams
            {
                FieldMask = Ucp.ParamFieldFeatures | Ucp.ParamFieldName,
                Features = Ucp.FeatureRma | Ucp.FeatureAm,
                Name = namePtr,
            };
            st = UcpNative.InitVersion(Ucp.ApiMajor, Ucp.ApiMinor, &p, config, out context);
            if (st != Ucp.StatusOk)
            {
                why = $"ucp_init failed: {UcpNative.Describe(st)}; check UCX_TLS (e.g. UCX_TLS=tcp) and that a transport is usable";
                return null;
            }
            var wp = new UcpWorkerParams
            {
                FieldMask = Ucp.WorkerParamFieldThreadMode | Ucp.WorkerParamFieldName,
                ThreadMode = Ucp.ThreadModeSingle,
                Name = namePtr,
            };
            st = UcpNative.WorkerCreate(context, &wp, out worker);
            if (st != Ucp.StatusOk)
            {
                UcpNative.Cleanup(context);
                why = $"ucp_worker_create failed: {UcpNative.Describe(st)}";
                return null;
            }
            st = UcpNative.WorkerGetAddress(worker, out nint addr, out nuint len);
            if (st != Ucp.StatusOk)
            {
                UcpNative.WorkerDestroy(worker);
                UcpNative.Cleanup(context);
                why = $"ucp_worker_get_address failed: {UcpNative.Describe(st)}";
                return null;
            }
            byte[] address = new ReadOnlySpan<byte>((void*)addr, checked((int)len)).ToArray();
            UcpNative.WorkerReleaseAddress(worker, addr);
            int id = Interlocked.Increment(ref s_nextWorker) - 1;
            if (id >= Workers.Length)
            {
                UcpNative.WorkerDestroy(worker);
                UcpNative.Cleanup(context);
                why = $"more than {Workers.Length} UCX workers were created in this process";
                return null;
            }
            var attr = new UcpContextAttr { FieldMask = Ucp.AttrFieldMemoryTypes };
            bool cuda = UcpNative.ContextQuery(context, &attr) == Ucp.StatusOk && (attr.MemoryTypes & (1UL << Ucp.MemoryTypeCuda)) != 0;
            var w = new UcxWorker(name, context, worker, address, id) { CudaAware = cuda };
            Workers[id] = w;
            w.SetHandler(AmRequest);
            w.SetHandler(AmReply);
            w._thread.Start();
            why = null;
            return w;
        }
        finally
        {
            Marshal.ZeroFreeCoTaskMemUTF8(namePtr);
            UcpNative.ConfigRelease(config);
        }
    }

    private void SetHandler(uint id)
    {
        var hp = new UcpAmHandlerParam
        {
            FieldMask = Ucp.AmHandlerFieldId | Ucp.AmHandlerFieldCb | Ucp.AmHandlerFieldArg | Ucp.AmHandlerFieldFlags,
            Id = id,
            Flags = 1, // UCP_AM_FLAG_WHOLE_MSG (ucp.h:565)
            Callback = (nint)(delegate* unmanaged[Cdecl]<nint, void*, nuint, void*, nuint, UcpAmRecvParam*, int>)&OnAm,
            Arg = _id,
        };
        int st = UcpNative.WorkerSetAmRecvHandler(_worker, &hp);
        if (st != Ucp.StatusOk)
            throw new TransferException($"ucp_worker_set_am_recv_handler({id}) failed: {UcpNative.Describe(st)}");
    }

    // ---- progress thread ----

    private void Loop()
    {
        int idle = 0;
        while (!_stop)
        {
            while (_commands.TryDequeue(out var command))
            {
                try
                {
                    command();
                }
                catch (Exception e) when (e is TransferException or InvalidOperationException or ArgumentException)
                {
                    // A failed command must not stop the thread every transfer of this agent depends on.
                    Console.Error.WriteLine($"kvfabric: a UCX command on '{Name}' failed: {e.Message}");
                }
            }
            uint n = UcpNative.WorkerProgress(_worker);
            if (_replies.Count > 0)
                SendReplies();
            if (n != 0)
            {
                idle = 0;
                continue;
            }
            if (_inUse > 0 || ++idle < 200)
            {
                Thread.Yield();
                continue;
            }
            // Nothing in flight: sleep until a command arrives, but keep progressing inbound traffic (one-sided
            // operations emulated over TCP or shared memory need the target's worker to progress).
            _wake.WaitOne(1);
            idle = 150;
        }
    }

    /// <summary>Runs an action on the progress thread.</summary>
    public void Post(Action action)
    {
        _commands.Enqueue(action);
        _wake.Set();
    }

    /// <summary>Runs a function on the progress thread and waits (bounded) for its result.</summary>
    public T Invoke<T>(Func<T> f, TimeSpan timeout)
    {
        if (Thread.CurrentThread == _thread)
            return f();
        var tcs = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Post(() =>
        {
            try
            {
                tcs.SetResult(f());
            }
            catch (Exception e)
            {
                tcs.SetException(e);
            }
        });
        if (!((IAsyncResult)tcs.Task).AsyncWaitHandle.WaitOne(timeout))
            throw new TransferException($"the UCX progress thread of '{Name}' did not answer within {timeout.TotalSeconds:0} s");
        return tcs.Task.GetAwaiter().GetResult(); // rethrows the original exception, not an AggregateException
    }

    private int Rent(IUcxCompletion owner, int tag)
    {
        if (_free.Count == 0)
        {
            int old = _owners.Length;
            Array.Resize(ref _owners, old * 2);
            Array.Resize(ref _tags, old * 2);
            for (int i = _owners.Length - 1; i >= old; i--)
                _free.Push(i);
        }
        int slot = _free.Pop();
        _owners[slot] = owner;
        _tags[slot] = tag;
        _inUse++;
        return slot;
    }

    private void Return(int slot, int status)
    {
        var owner = _owners[slot]!;
        int tag = _tags[slot];
        _owners[slot] = null;
        _free.Push(slot);
        _inUse--;
        owner.Complete(tag, status);
    }

    private nint UserData(int slot) => ((nint)_id << 32) | (nint)(uint)slot;

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static void OnSend(nint request, int status, nint userData)
    {
        var w = Workers[(int)(userData >> 32)];
        if (request != 0)
            UcpNative.RequestFree(request);
        w?.Return((int)(userData & 0xFFFFFFFF), status);
    }

    /// <summary>Settles an nbx call: immediate completion, error, or a request whose callback will fire.</summary>
    private void Started(nint request, int slot)
    {
        if (request == 0)
            Return(slot, Ucp.StatusOk);
        else if (UcpNative.IsError(request, out int status))
            Return(slot, status);
    }

    private UcpRequestParam Param(int slot) => new()
    {
        OpAttrMask = Ucp.OpAttrCallback | Ucp.OpAttrUserData,
        Callback = (nint)(delegate* unmanaged[Cdecl]<nint, int, nint, void>)&OnSend,
        UserData = UserData(slot),
    };

    // ---- operations (progress thread only) ----

    public void Put(UcxEndpoint ep, nint local, int length, ulong remote, nint rkey, IUcxCompletion owner, int tag)
    {
        int slot = Rent(owner, tag);
        var p = Param(slot);
        Started(UcpNative.PutNbx(ep.Handle, local, (nuint)length, remote, rkey, &p), slot);
    }

    public void Get(UcxEndpoint ep, nint local, int length, ulong remote, nint rkey, IUcxCompletion owner, int tag)
    {
        int slot = Rent(owner, tag);
        var p = Param(slot);
        Started(UcpNative.GetNbx(ep.Handle, local, (nuint)length, remote, rkey, &p), slot);
    }

    public void Flush(UcxEndpoint ep, IUcxCompletion owner, int tag)
    {
        int slot = Rent(owner, tag);
        var p = Param(slot);
        Started(UcpNative.EpFlushNbx(ep.Handle, &p), slot);
    }

    private sealed class NativeBuffer(nint pointer) : IUcxCompletion
    {
        public IUcxCompletion? Then;
        public int ThenTag;
        public void Complete(int tag, int status)
        {
            NativeMemory.Free((void*)pointer);
            Then?.Complete(ThenTag, status);
        }
    }

    /// <summary>Sends an AM (eager, so the target gets it whole in its callback); header and data are copied first.</summary>
    public void SendAm(UcxEndpoint ep, uint id, ReadOnlySpan<byte> header, ReadOnlySpan<byte> data, IUcxCompletion? then, int thenTag)
    {
        nint buf = (nint)NativeMemory.Alloc((nuint)Math.Max(1, header.Length + data.Length));
        header.CopyTo(new Span<byte>((void*)buf, header.Length));
        data.CopyTo(new Span<byte>((void*)(buf + header.Length), data.Length));
        var owner = new NativeBuffer(buf) { Then = then, ThenTag = thenTag };
        int slot = Rent(owner, 0);
        var p = Param(slot);
        p.OpAttrMask |= Ucp.OpAttrFlags;
        p.Flags = Ucp.AmSendFlagReply | Ucp.AmSendFlagEager;
        Started(UcpNative.AmSendNbx(ep.Handle, id, (void*)buf, (nuint)header.Length, (void*)(buf + header.Length), (nuint)data.Length, &p), slot);
    }

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static int OnAm(nint arg, void* header, nuint headerLength, void* data, nuint length, UcpAmRecvParam* param)
    {
        var w = Workers[(int)arg];
        if (w is null)
            return Ucp.StatusOk;
        try
        {
            w.Received(new ReadOnlySpan<byte>(header, (int)headerLength), data, (int)length, param);
        }
        catch (Exception e)
        {
            // An exception must not unwind into UCX: count it as a malformed message.
            Console.Error.WriteLine($"kvfabric: UCX active message handler of '{w.Name}' failed: {e.Message}");
        }
        return Ucp.StatusOk;
    }

    private void Received(ReadOnlySpan<byte> header, void* data, int length, UcpAmRecvParam* param)
    {
        if (header.Length < 9)
            return;
        ulong seq = BitConverter.ToUInt64(header);
        // FLAG_DATA only says the data may be kept past the callback; FLAG_RNDV says it has not arrived yet.
        bool whole = (param->RecvAttr & Ucp.AmRecvAttrFlagRndv) == 0;
        if (header[8] == 0xFF)
        {
            // Replies are sent eager, so their data is here; a rendezvous reply would be a peer bug: drop its data.
            byte[] payload = whole ? new ReadOnlySpan<byte>(data, length).ToArray() : [];
            OnReply?.Invoke(seq, header.Length > 9 ? header[9] : (byte)0, payload);
            return;
        }
        (byte Status, byte[]? Payload) answer;
        if (RefuseRequest?.Invoke(header[8], length) == true)
            answer = ((byte)Tcp.WireStatus.Malformed, null);
        else if (!whole)
            answer = ((byte)Tcp.WireStatus.Malformed, null); // rendezvous data: we asked for eager, so refuse it
        else
        {
            try
            {
                answer = OnRequest?.Invoke(header.ToArray(), new ReadOnlySpan<byte>(data, length).ToArray()) ?? ((byte)Tcp.WireStatus.Internal, null);
            }
            catch (Exception e)
            {
                // Still answered: without a reply the initiator would wait for its deadline.
                Console.Error.WriteLine($"kvfabric: a UCX request to '{Name}' failed: {e.GetType().Name}: {e.Message}");
                answer = ((byte)Tcp.WireStatus.Internal, null);
            }
        }
        if ((param->RecvAttr & Ucp.AmRecvAttrFieldReplyEp) != 0 && param->ReplyEp != 0)
        {
            // Replies are sent after this progress call returns, not from inside the UCX callback.
            int n = answer.Payload?.Length ?? 0;
            nint h = (nint)NativeMemory.Alloc((nuint)(10 + n));
            BitConverter.TryWriteBytes(new Span<byte>((void*)h, 8), seq);
            ((byte*)h)[8] = 0xFF;
            ((byte*)h)[9] = answer.Status;
            answer.Payload.AsSpan().CopyTo(new Span<byte>((void*)(h + 10), n));
            _replies.Add((param->ReplyEp, h, n));
        }
    }

    private void SendReplies()
    {
        foreach (var (ep, h, n) in _replies)
        {
            var owner = new NativeBuffer(h);
            int slot = Rent(owner, 0);
            var p = Param(slot);
            p.OpAttrMask |= Ucp.OpAttrFlags;
            p.Flags = Ucp.AmSendFlagEager;
            Started(UcpNative.AmSendNbx(ep, AmReply, (void*)h, 10, n > 0 ? (void*)(h + 10) : null, (nuint)n, &p), slot);
        }
        _replies.Clear();
    }

    // ---- endpoints ----

    [UnmanagedCallersOnly(CallConvs = [typeof(CallConvCdecl)])]
    private static void OnEpError(nint arg, nint ep, int status)
    {
        var w = Workers[(int)(arg >> 32)];
        w?.EndpointFailed((int)(arg & 0xFFFFFFFF), status);
    }

    private void EndpointFailed(int epId, int status)
    {
        if (epId >= _endpoints.Count || _endpoints[epId] is not { } ep)
            return;
        string why = $"UCX reported the connection to '{ep.PeerName}' failed: {UcpNative.Describe(status)}";
        ep.Failure ??= why;
        OnEndpointError?.Invoke(ep, why);
    }

    /// <summary>Creates an endpoint to a peer's packed worker address (error mode PEER), and reads which transports it uses.</summary>
    public UcxEndpoint Connect(ReadOnlySpan<byte> address, string peerName)
    {
        var ep = new UcxEndpoint(_endpoints.Count, peerName);
        _endpoints.Add(ep);
        fixed (byte* a = address)
        {
            var p = new UcpEpParams
            {
                FieldMask = Ucp.EpParamFieldRemoteAddress | Ucp.EpParamFieldErrHandlingMode | Ucp.EpParamFieldErrHandler,
                Address = (nint)a,
                ErrMode = Ucp.ErrHandlingModePeer,
                ErrHandlerCb = (nint)(delegate* unmanaged[Cdecl]<nint, nint, int, void>)&OnEpError,
                ErrHandlerArg = ((nint)_id << 32) | (nint)(uint)ep.Id,
            };
            int st = UcpNative.EpCreate(_worker, &p, out ep.Handle);
            if (st == StatusUnreachable)
            {
                // UCX 1.13 offers no shared-memory transport with peer-failure handling (only tcp and RDMA have it):
                // connect without it; the backend then watches the peer process itself (docs/transfer.md).
                p.FieldMask = Ucp.EpParamFieldRemoteAddress;
                st = UcpNative.EpCreate(_worker, &p, out ep.Handle);
                ep.PeerErrorHandling = false;
            }
            if (st != Ucp.StatusOk)
            {
                _endpoints[ep.Id] = null;
                throw new TransferException($"ucp_ep_create to '{peerName}' failed: {UcpNative.Describe(st)}; is the peer's UCX_TLS compatible with ours?");
            }
        }
        ep.Info = PrintInfo(ep.Handle);
        ep.Transports = ParseTransports(ep.Info);
        return ep;
    }

    [GeneratedRegex(@"lane\[\d+\]:\s+\d+:(?<tl>[\w\-]+/[\w\-.:]+)")]
    private static partial Regex LaneRegex();

    /// <summary>The distinct "transport/device" names of an endpoint's lanes, parsed from ucp_ep_print_info.</summary>
    internal static IReadOnlyList<string> ParseTransports(string info) =>
        LaneRegex().Matches(info).Select(m => m.Groups["tl"].Value).Distinct().ToArray();

    private static string PrintInfo(nint ep)
    {
        nint stream = UcpNative.OpenMemstream(out nint buffer, out nuint size);
        if (stream == 0)
            return "";
        UcpNative.EpPrintInfo(ep, stream);
        UcpNative.Fclose(stream);
        string text = Marshal.PtrToStringUTF8(buffer, (int)size);
        UcpNative.Free(buffer);
        return text;
    }

    public nint Rkey(UcxEndpoint ep, int region, ReadOnlySpan<byte> packed)
    {
        if (ep.Rkeys.TryGetValue(region, out nint rkey))
            return rkey;
        if (packed.IsEmpty)
            throw new TransferException("the peer's metadata carries no UCX remote key for that region");
        fixed (byte* b = packed)
        {
            int st = UcpNative.EpRkeyUnpack(ep.Handle, b, out rkey);
            if (st != Ucp.StatusOk)
                throw new TransferException($"ucp_ep_rkey_unpack failed: {UcpNative.Describe(st)}");
        }
        ep.Rkeys[region] = rkey;
        return rkey;
    }

    /// <summary>Destroys the rkeys and closes the endpoint (forced: in-flight operations complete with an error), progressing until done.</summary>
    public void Close(UcxEndpoint ep, TimeSpan timeout)
    {
        if (ep.Closed)
            return;
        ep.Closed = true;
        ep.Failure ??= "the endpoint was closed";
        foreach (var rkey in ep.Rkeys.Values)
            UcpNative.RkeyDestroy(rkey);
        ep.Rkeys.Clear();
        var p = new UcpRequestParam { OpAttrMask = Ucp.OpAttrFlags, Flags = Ucp.EpCloseFlagForce };
        nint req = UcpNative.EpCloseNbx(ep.Handle, &p);
        if (req != 0 && !UcpNative.IsError(req, out _))
        {
            long start = Stopwatch.GetTimestamp();
            while (UcpNative.RequestCheckStatus(req) == Ucp.StatusInProgress && Stopwatch.GetElapsedTime(start) < timeout)
                UcpNative.WorkerProgress(_worker);
            UcpNative.RequestFree(req);
        }
        _endpoints[ep.Id] = null;
    }

    /// <summary>Progresses until no operation of <paramref name="done"/> is pending (bounded).</summary>
    public bool ProgressUntil(Func<bool> done, TimeSpan timeout)
    {
        long start = Stopwatch.GetTimestamp();
        while (!done())
        {
            if (Stopwatch.GetElapsedTime(start) > timeout)
                return false;
            if (UcpNative.WorkerProgress(_worker) == 0)
                Thread.Yield();
        }
        return true;
    }

    // ---- memory ----

    /// <summary>Maps a region for remote access and packs its rkey (CUDA device memory: only on a CUDA-aware UCX).</summary>
    public (nint Memh, byte[] Rkey) MapMemory(nint address, ulong length, bool cudaDevice = false)
    {
        var p = new UcpMemMapParams
        {
            FieldMask = Ucp.MemMapFieldAddress | Ucp.MemMapFieldLength | Ucp.MemMapFieldProt | (cudaDevice ? Ucp.MemMapFieldMemoryType : 0),
            Address = address,
            Length = (nuint)length,
            Prot = RemoteReadWrite,
            MemoryType = cudaDevice ? Ucp.MemoryTypeCuda : 0,
        };
        int st = UcpNative.MemMap(_context, &p, out nint memh);
        if (st != Ucp.StatusOk)
            throw new TransferException($"ucp_mem_map of [0x{address:x}, +{length}) failed: {UcpNative.Describe(st)}");
        return (memh, PackRkey(memh));
    }

    /// <summary>
    /// Lets UCX allocate a region (ucp_mem_map with UCP_MEM_MAP_ALLOCATE) and packs its rkey. UCX then picks memory its
    /// transports can map into a peer (a posix or sysv shared segment first, per UCX_ALLOC_PRIO), so a same-host put or
    /// get is one copy by the initiator; memory UCX did not allocate is reached through active messages on those
    /// transports instead. ucp_mem_unmap frees it.
    /// </summary>
    public (nint Memh, byte[] Rkey, nint Address) AllocateMemory(ulong length)
    {
        var p = new UcpMemMapParams
        {
            FieldMask = Ucp.MemMapFieldAddress | Ucp.MemMapFieldLength | Ucp.MemMapFieldFlags | Ucp.MemMapFieldProt,
            Address = 0,
            Length = (nuint)length,
            Flags = Ucp.MemMapAllocate,
            Prot = RemoteReadWrite,
        };
        int st = UcpNative.MemMap(_context, &p, out nint memh);
        if (st != Ucp.StatusOk)
            throw new TransferException($"ucp_mem_map could not allocate {length} bytes: {UcpNative.Describe(st)}; allocate the region yourself and register it");
        var attr = new UcpMemAttr { FieldMask = Ucp.MemAttrFieldAddress | Ucp.MemAttrFieldLength };
        st = UcpNative.MemQuery(memh, &attr);
        if (st != Ucp.StatusOk || attr.Address == 0 || (ulong)attr.Length < length)
        {
            UcpNative.MemUnmap(_context, memh);
            throw new TransferException($"ucp_mem_query of a {length}-byte UCX allocation failed: {UcpNative.Describe(st)}");
        }
        return (memh, PackRkey(memh), attr.Address);
    }

    private const uint RemoteReadWrite = Ucp.ProtLocalRead | Ucp.ProtLocalWrite | Ucp.ProtRemoteRead | Ucp.ProtRemoteWrite;

    private byte[] PackRkey(nint memh)
    {
        int st = UcpNative.RkeyPack(_context, memh, out nint buf, out nuint size);
        if (st != Ucp.StatusOk)
        {
            UcpNative.MemUnmap(_context, memh);
            throw new TransferException($"ucp_rkey_pack failed: {UcpNative.Describe(st)}");
        }
        byte[] rkey = new ReadOnlySpan<byte>((void*)buf, checked((int)size)).ToArray();
        UcpNative.RkeyBufferRelease(buf);
        _memhs.Add(memh);
        return rkey;
    }

    public void UnmapMemory(nint memh)
    {
        if (_memhs.Remove(memh))
            UcpNative.MemUnmap(_context, memh);
    }

    public void Dispose()
    {
        if (_stop)
            return;
        try
        {
            Invoke(() =>
            {
                foreach (var ep in _endpoints.ToArray())
                {
                    if (ep is not null)
                        Close(ep, TimeSpan.FromSeconds(2));
                }
                ProgressUntil(() => _inUse == 0, TimeSpan.FromSeconds(2));
                return 0;
            }, TimeSpan.FromSeconds(10));
        }
        catch (TransferException)
        {
            // The progress thread is stuck; tear down anyway below once it has stopped.
        }
        _stop = true;
        _wake.Set();
        _thread.Join(TimeSpan.FromSeconds(10));
        foreach (var memh in _memhs)
            UcpNative.MemUnmap(_context, memh);
        _memhs.Clear();
        UcpNative.WorkerDestroy(_worker);
        UcpNative.Cleanup(_context);
        Workers[_id] = null;
        _wake.Dispose();
    }
}
