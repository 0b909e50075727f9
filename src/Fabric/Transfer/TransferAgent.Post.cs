using System.Diagnostics;
using KvFabric.Memory;
using KvFabric.Memory.Device;
using KvFabric.Transfer.Cuda;
using KvFabric.Transfer.Tcp;

namespace KvFabric.Transfer;

public sealed partial class TransferAgent
{
    /// <summary>The largest notification (as over TCP, where it is the control frame limit): senders refuse more, targets drop it.</summary>
    internal const int MaxNotificationBytes = 1 << 20;
    private static readonly TransferOptions DefaultOptions = new();

    /// <summary>
    /// Validates a READ or WRITE of <paramref name="local"/> against <paramref name="remoteDescriptors"/> once, and returns
    /// a request that can be posted many times. Every misuse is refused here, before a byte moves: mismatched counts or
    /// lengths, zero lengths, ranges outside registered or exported regions, overlapping destinations.
    /// </summary>
    public TransferRequest Prepare(TransferOp op, ReadOnlySpan<MemoryDescriptor> local, RemoteAgent remote,
        ReadOnlySpan<MemoryDescriptor> remoteDescriptors, TransferOptions? options = null)
    {
        ArgumentNullException.ThrowIfNull(remote);
        options ??= DefaultOptions;
        if (op is not (TransferOp.Read or TransferOp.Write))
            throw new TransferException($"unknown transfer op {(byte)op}: use Read or Write");
        lock (_remotesLock)
        {
            if (remote.Unloaded || !_remotes.TryGetValue(remote.AgentId, out var current) || current != remote)
                throw new TransferException($"remote agent '{remote.Name}' is not loaded (unloaded or replaced by a reload): use the RemoteAgent LoadRemoteAsync returned last");
        }
        if (local.Length != remoteDescriptors.Length)
            throw new TransferException($"{local.Length} local descriptors but {remoteDescriptors.Length} remote ones: they pair up one to one");
        if (local.Length == 0)
            throw new TransferException("a transfer needs at least one descriptor");
        if (local.Length > Options.MaxDescriptors)
            throw new TransferException($"{local.Length} descriptors exceed this agent's limit of {Options.MaxDescriptors}: split the transfer");
        if (options.Deadline <= TimeSpan.Zero)
            throw new TransferException($"deadline {options.Deadline} must be positive");
        if (options.Notification is { Length: > MaxNotificationBytes } big)
            throw new TransferException($"a {big.Length}-byte notification exceeds the {MaxNotificationBytes}-byte limit: send bulk data as a transfer");
        Checksums.EnsureAvailable(options.Checksum);

        // Chunks must fit both ends: the target refuses frames above the limit it advertised in its metadata.
        int chunkBytes = Math.Min(Options.MaxChunkBytes, remote.Metadata.MaxChunkBytes);
        int[] remoteRegion = new int[local.Length];
        RegisteredRegion?[]? deviceOf = null;   // per descriptor: its device region, when the local side is device memory
        int[]? devicePieces = null;
        ulong total = 0;
        int chunkCount = 0;
        for (int i = 0; i < local.Length; i++)
        {
            var l = local[i];
            var r = remoteDescriptors[i];
            if (l.Length == 0 || r.Length == 0)
                throw new TransferException($"descriptor {i} has zero length: every descriptor must move at least one byte");
            if (l.Length != r.Length)
                throw new TransferException($"descriptor {i}: local {l} and remote {r} differ in length");
            var region = _registry.Find(l.Address, l.Length)
                ?? throw new TransferException($"local descriptor {i} {l} is not inside any region registered with agent '{Name}': register that memory first");
            if (region.Closing)
                throw new TransferException($"local descriptor {i} {l} is in {region}, which is being deregistered: it takes no new transfers");
            if (region.Device is not null)
            {
                (deviceOf ??= new RegisteredRegion?[local.Length])[i] = region;
                (devicePieces ??= new int[local.Length])[i] = (int)((l.Length + (ulong)chunkBytes - 1) / (ulong)chunkBytes);
            }
            remoteRegion[i] = remote.FindRegion(r.Address, r.Length);
            if (remoteRegion[i] < 0)
                throw new TransferException($"remote descriptor {i} {r} is not inside any region agent '{remote.Name}' exported to us: we hold no key for it (ask the peer to export that region)");
            total += l.Length;
            chunkCount += (int)((l.Length + (ulong)chunkBytes - 1) / (ulong)chunkBytes);
        }
        CheckNoOverlap(op == TransferOp.Read ? local : remoteDescriptors, op == TransferOp.Read ? "local" : "remote");

        var backend = ChooseBackend(options.Backend, remote, remoteRegion);
        if (backend == BackendKind.Ucx && options.Checksum != ChecksumKind.None)
        {
            foreach (int r in remoteRegion)
            {
                if (remote.Metadata.Regions[r].Kind == MemoryKind.Device)
                    throw new TransferException($"checksums over UCX are computed by the target in host memory, and remote region {remote.Metadata.Regions[r].Id} is device memory: use ChecksumKind.None over UCX, or TCP (staged and verified on its side)");
            }
        }
        int deviceChunkCount = 0;
        for (int i = 0; deviceOf is not null && i < deviceOf.Length; i++)
        {
            // A CUDA-aware UCX moves a device region it mapped directly; checksums still need the bytes on the host.
            if (deviceOf[i] is { } r && backend == BackendKind.Ucx && options.Checksum == ChecksumKind.None && _ucx!.RkeyOf(r.Id) is not null)
                deviceOf[i] = null;
            else if (deviceOf[i] is not null)
                deviceChunkCount += devicePieces![i];
        }
        if (deviceChunkCount > Options.DeviceStagingSlots)
            throw new TransferException($"{deviceChunkCount} chunks of device memory in one request, but device memory is staged through {Options.DeviceStagingSlots} host slots of {Options.MaxChunkBytes} bytes: split the request or raise TransferAgentOptions.DeviceStagingSlots");
        int streams = options.Streams > 0 ? options.Streams : backend == BackendKind.Tcp ? Options.TcpStreams : Options.ShmStreams;
        if (streams > TcpPeer.MaxStreams)
            throw new TransferException($"{streams} streams exceed the limit of {TcpPeer.MaxStreams}");

        var chunks = new Chunk[chunkCount];
        int k = 0;
        for (int i = 0; i < local.Length; i++)
        {
            var info = remote.Metadata.Regions[remoteRegion[i]];
            ulong baseOffset = remoteDescriptors[i].Address - info.Address;
            for (ulong done = 0; done < local[i].Length; done += (ulong)chunkBytes)
            {
                int len = (int)Math.Min((ulong)chunkBytes, local[i].Length - done);
                chunks[k++] = new Chunk(i, (nint)(local[i].Address + done), remoteRegion[i], baseOffset + done, len);
            }
        }
        var request = new TransferRequest(this, op, remote, chunks, local.Length, total, options, backend, streams);
        if (deviceChunkCount > 0)
        {
            var which = new int[deviceChunkCount];
            var regions = new DeviceRegion[deviceChunkCount];
            var addresses = new nint[deviceChunkCount];
            int d = 0;
            for (int c = 0; c < chunks.Length; c++)
            {
                if (deviceOf![chunks[c].Descriptor] is { } region)
                    (which[d], regions[d], addresses[d++]) = (c, region.Device!, chunks[c].Local);
            }
            request.Device = (which, regions, addresses);
        }
        return request;
    }

    private static void CheckNoOverlap(ReadOnlySpan<MemoryDescriptor> destinations, string side)
    {
        if (destinations.Length < 2)
            return;
        var sorted = destinations.ToArray();
        Array.Sort(sorted, (a, b) => a.Address.CompareTo(b.Address));
        for (int i = 1; i < sorted.Length; i++)
        {
            if (sorted[i].Address < sorted[i - 1].End)
                throw new TransferException($"{side} destination descriptors {sorted[i - 1]} and {sorted[i]} overlap: the result would depend on arrival order");
        }
    }

    private BackendKind ChooseBackend(BackendKind wanted, RemoteAgent remote, int[] remoteRegions)
    {
        if (wanted == BackendKind.Auto && Options.PreferUcx && _ucx is not null && _ucx.CanReach(remote, remoteRegions, out _))
            return BackendKind.Ucx;
        if (wanted == BackendKind.Ucx && _ucx is null)
            throw new TransferException($"the Ucx backend was requested but agent '{Name}' runs without UCX: set TransferAgentOptions.EnableUcx (and install libucx0)");
        if (wanted == BackendKind.Auto)
            return _shm.CanReach(remote, remoteRegions, out _) ? BackendKind.SharedMemory : BackendKind.Tcp;
        if (!Backend(wanted).CanReach(remote, remoteRegions, out string? why))
            throw new TransferException($"the {wanted} backend cannot reach '{remote.Name}': {why}");
        return wanted;
    }

    /// <summary>
    /// Posts a prepared request. Completes when every descriptor is settled: Success means all bytes are at the
    /// destination (verified, when a checksum was asked for) and the peer acknowledged them, and the notification, if
    /// any, was queued at the target. Failures are reported in the result, never thrown.
    /// </summary>
    public async Task<TransferResult> PostAsync(TransferRequest request, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(request);
        if (request.Agent != this)
            throw new TransferException("this request was prepared by another agent");
        ObjectDisposedException.ThrowIf(_disposed != 0, this);
        if (!request.TryBeginPost(NextPostId()))
            throw new InvalidOperationException("this request is already posted: wait for that post to finish before posting it again");
        Interlocked.Increment(ref Stats.Posts);
        if (!request.Remote.TryEnterPost())
            return Finish(request, new TransferResult(TransferStatus.Failed, $"remote agent '{request.Remote.Name}' was unloaded or reloaded: prepare against the RemoteAgent LoadRemoteAsync returned last"), []);
        List<RegisteredRegion> held = [];
        try
        {
            held = AcquireLocalRegions(request, out string? closed);
            var result = closed is not null
                ? new TransferResult(TransferStatus.Failed, closed)
                : request.Device is null
                    ? await RunAsync(request, cancellationToken).ConfigureAwait(false)
                    : await RunStagedAsync(request, cancellationToken).ConfigureAwait(false);
            return Finish(request, result, held);
        }
        catch (Exception e) when (e is not TransferException)
        {
            // Whatever went wrong, the request must not stay posted nor the regions held.
            return Finish(request, new TransferResult(TransferStatus.Failed, $"internal error: {e.Message}"), held);
        }
        finally
        {
            request.Remote.ExitPost();
        }
    }

    /// <summary>A request with local device chunks: stage them through host slots around the ordinary run.</summary>
    private async Task<TransferResult> RunStagedAsync(TransferRequest request, CancellationToken cancellationToken)
    {
        var (which, regions, addresses) = request.Device!.Value;
        BlockSlot[]? slots;
        long start = Stopwatch.GetTimestamp();
        try
        {
            slots = await Staging.StageAsync(request, which, regions, cancellationToken).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
        {
            return new TransferResult(TransferStatus.Cancelled, "cancelled by the caller while waiting for device staging slots");
        }
        catch (DeviceMemoryException e)
        {
            return new TransferResult(TransferStatus.Failed, $"copying device memory to the staging slots failed: {e.Message}");
        }
        if (slots is null)
            return new TransferResult(TransferStatus.TimedOut, $"all {Staging.Slots} device staging slots stayed in use past the deadline of {request.Options.Deadline.TotalMilliseconds:0} ms: raise TransferAgentOptions.DeviceStagingSlots or post fewer device transfers at once");
        // One deadline for the whole post: what waiting for slots and copying out of the device took is not given again.
        TimeSpan left = request.Options.Deadline - Stopwatch.GetElapsedTime(start);
        if (left <= TimeSpan.Zero)
        {
            Staging.Unstage(request, which, regions, addresses, slots, copyIn: false, _ => false);
            return new TransferResult(TransferStatus.TimedOut, $"staging the device chunks (waiting for slots, copying out of the device) took the whole deadline of {request.Options.Deadline.TotalMilliseconds:0} ms; nothing was sent");
        }
        var result = await RunAsync(request, cancellationToken, left).ConfigureAwait(false);
        if (request.Quarantine is { } stuck)
        {
            // The backend may still write into (or read) the slots: they go back to the pool, and the chunks to their
            // device addresses, only once it stopped. Nothing that arrived is copied into device memory.
            request.Quarantine = stuck.ContinueWith(_ => Staging.Unstage(request, which, regions, addresses, slots, copyIn: false, _ => false),
                CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
            return result;
        }
        try
        {
            // A READ's bytes reach device memory before the post reports them; only descriptors that arrived whole are copied.
            bool read = request.Op == TransferOp.Read;
            Staging.Unstage(request, which, regions, addresses, slots, read, k => request.GetStatus(request.Chunks[which[k]].Descriptor) == DescriptorStatus.Done);
        }
        catch (DeviceMemoryException e)
        {
            request.FailDone(DescriptorStatus.Failed, $"copying the READ into device memory failed: {e.Message}");
            return new TransferResult(TransferStatus.Failed, request.FirstError);
        }
        return result;
    }

    // `budget`: what is left of the request's deadline (all of it unless staging took part).
    private async Task<TransferResult> RunAsync(TransferRequest request, CancellationToken cancellationToken, TimeSpan? budget = null)
    {
        var backend = Backend(request.Backend);
        using var deadline = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        deadline.CancelAfter(budget ?? request.Options.Deadline);
        Task io = Task.CompletedTask;
        TransferResult result;
        try
        {
            io = backend.StartAsync(request, deadline.Token);
            await request.AllSettled.WaitAsync(deadline.Token).ConfigureAwait(false);
            await io.WaitAsync(deadline.Token).ConfigureAwait(false);
            if (request.AllDone())
                await ConfirmAsync(request, deadline.Token).ConfigureAwait(false);
            result = request.AllDone()
                ? new TransferResult(TransferStatus.Success, null)
                : new TransferResult(TransferStatus.Failed, request.FirstError);
        }
        catch (OperationCanceledException) when (deadline.IsCancellationRequested)
        {
            string? stuck = await StopAsync(backend, request, io).ConfigureAwait(false);
            bool cancelled = cancellationToken.IsCancellationRequested;
            var status = cancelled ? DescriptorStatus.Cancelled : DescriptorStatus.TimedOut;
            string why = (cancelled
                ? "cancelled by the caller"
                : $"the deadline of {request.Options.Deadline.TotalMilliseconds:0} ms passed before '{request.Remote.Name}' completed it")
                + (stuck is null ? "" : $"; {stuck}");
            request.SettleAllPending(status, why);
            request.FailDone(status, why);
            result = new TransferResult(cancelled ? TransferStatus.Cancelled : TransferStatus.TimedOut, why);
        }
        catch (Exception e) when (e is not OperationCanceledException)
        {
            // A defect, not an I/O outcome: still stop all I/O on the request before reporting it.
            string? stuck = await StopAsync(backend, request, io).ConfigureAwait(false);
            string why = $"internal error: {e.GetType().Name}: {e.Message}" + (stuck is null ? "" : $"; {stuck}");
            request.SettleAllPending(DescriptorStatus.Failed, why);
            request.FailDone(DescriptorStatus.Failed, why);
            result = new TransferResult(TransferStatus.Failed, why);
        }
        finally
        {
            _tcp.Finish(request);
        }
        return result;
    }

    /// <summary>
    /// Aborts the request's I/O and waits for it; null once nothing of it can touch memory. Otherwise (the backend could
    /// not confirm that) the I/O task becomes the request's quarantine and the reason is returned.
    /// </summary>
    private static async Task<string?> StopAsync(ITransferBackend backend, TransferRequest request, Task io)
    {
        string? stuck = await backend.AbortAsync(request).ConfigureAwait(false);
        if (stuck is null)
            await io.ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        else
            request.Quarantine = io;
        return stuck;
    }

    private TransferResult Finish(TransferRequest request, TransferResult result, List<RegisteredRegion> held)
    {
        if (!result.IsSuccess)
            Interlocked.Increment(ref Stats.Failures);
        if (request.Quarantine is { } stuck)
        {
            // The backend may still touch the request's memory: its regions stay held (deregistering them fails) and
            // the request stays posted until it has stopped; the caller gets the result, which says so, now.
            stuck.ContinueWith(_ => EndPost(request, result, held), CancellationToken.None, TaskContinuationOptions.None, TaskScheduler.Default);
            return result;
        }
        EndPost(request, result, held);
        return result;
    }

    private static void EndPost(TransferRequest request, TransferResult result, List<RegisteredRegion> held)
    {
        foreach (var r in held)
            r.Release();
        request.EndPost(result);
    }

    private List<RegisteredRegion> AcquireLocalRegions(TransferRequest request, out string? closed)
    {
        var held = new List<RegisteredRegion>(2);
        closed = null;
        RegisteredRegion? last = null;
        foreach (var c in request.Chunks)
        {
            if (last is not null && (ulong)c.Local >= last.Address && (ulong)c.Local + (ulong)c.Length <= last.Address + last.Length)
                continue;
            var region = _registry.Find((ulong)c.Local, (ulong)c.Length);
            if (region is null || !region.TryAcquire())
            {
                closed = $"local memory at 0x{c.Local:x} was deregistered (or is being deregistered) after the request was prepared: prepare it again";
                return held;
            }
            if (!held.Contains(region))
                held.Add(region);
            else
                region.Release();
            last = region;
        }
        return held;
    }

    /// <summary>
    /// The last step of a successful data phase: deliver the notification, or (shared memory without one) fence, so the
    /// peer has acknowledged the transfer while alive. For TCP writes every chunk was already acknowledged.
    /// </summary>
    private async Task ConfirmAsync(TransferRequest request, CancellationToken ct)
    {
        (WireStatus Status, string? Error) reply;
        if (request.Options.Notification is { } ucxMessage && request.Backend == BackendKind.Ucx)
            reply = await _ucx!.NotifyAsync(request.Remote, ucxMessage, ct).ConfigureAwait(false); // sent after the flush
        else if (request.Options.Notification is { } message)
            reply = await _tcp.ControlAsync(request.Remote, FrameType.Notify, message, ct).ConfigureAwait(false);
        else if (request.Backend == BackendKind.SharedMemory)
            reply = await _tcp.ControlAsync(request.Remote, FrameType.Fence, ReadOnlyMemory<byte>.Empty, ct).ConfigureAwait(false);
        else
            return;
        if (reply.Status != WireStatus.Ok)
        {
            var status = reply.Status == WireStatus.QueueFull ? DescriptorStatus.Failed : DescriptorStatus.PeerDisconnected;
            request.FailDone(status, $"'{request.Remote.Name}' did not confirm the transfer: {reply.Error}");
        }
    }

    /// <summary>Sends a notification with no transfer (NIXL's genNotif).</summary>
    public async Task<TransferResult> SendNotificationAsync(RemoteAgent remote, ReadOnlyMemory<byte> message, TimeSpan? deadline = null, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(remote);
        if (message.Length > MaxNotificationBytes)
            throw new TransferException($"a {message.Length}-byte notification exceeds the {MaxNotificationBytes}-byte limit");
        using var cts = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        cts.CancelAfter(deadline ?? DefaultOptions.Deadline);
        try
        {
            var (status, error) = await _tcp.ControlAsync(remote, FrameType.Notify, message, cts.Token).ConfigureAwait(false);
            return status == WireStatus.Ok ? new TransferResult(TransferStatus.Success, null) : new TransferResult(TransferStatus.Failed, error);
        }
        catch (OperationCanceledException) when (cts.IsCancellationRequested)
        {
            return new TransferResult(cancellationToken.IsCancellationRequested ? TransferStatus.Cancelled : TransferStatus.TimedOut,
                $"notification to '{remote.Name}' not acknowledged in time");
        }
    }
}
