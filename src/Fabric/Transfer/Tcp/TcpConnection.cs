using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using System.Text;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// The initiator side of one connection to a peer. A transmit thread sends WRITE/READ_REQ frames for the stripes queued
/// to it with blocking sends, and a receive thread settles chunks from acknowledgements and lands READ_DATA payloads
/// directly in local memory: two threads that stream, like iperf3's, instead of a thread-pool hop per send
/// (docs/transfer.md has the measurements). When the connection breaks, every chunk waiting on it fails at once.
/// </summary>
internal sealed class TcpConnection
{
    private const int MaxQueuedStripes = 1024;
    private readonly TcpPeer _peer;
    private readonly FrameChannel _channel;
    private readonly TaskCompletionSource<string?> _hello = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _receiveStopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _transmitStopped = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly ConcurrentQueue<Job> _queue = new();
    private readonly SemaphoreSlim _queueSignal = new(0);
    private readonly Lock _queueLock = new();
    private int _queued;
    private bool _transmitExited;
    private volatile bool _transmitStarted;
    private volatile string? _fault;

    /// <summary>Work for the transmit thread, the only sender on this connection.</summary>
    private abstract class Job
    {
        public TaskCompletionSource Done { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);
    }

    private sealed class Stripe(TransferRequest request, int streams, CancellationToken ct) : Job
    {
        public TransferRequest Request { get; } = request;
        public int Streams { get; } = streams;
        public CancellationToken Ct { get; } = ct;
    }

    private sealed class Control(FrameHeader header, ReadOnlyMemory<byte> payload) : Job
    {
        public FrameHeader Header { get; } = header;
        public ReadOnlyMemory<byte> Payload { get; } = payload;
    }

    private TcpConnection(TcpPeer peer, int index, Socket socket)
    {
        _peer = peer;
        Index = index;
        _channel = new FrameChannel(socket);
    }

    public int Index { get; }
    public bool IsHealthy => _fault is null;

    public static async Task<TcpConnection> ConnectAsync(TcpPeer peer, int index, uint abandoned, CancellationToken ct)
    {
        var md = peer.Remote.Metadata;
        var agent = peer.Backend.Agent;
        // The name is resolved first, under the token: a blocking Connect(host, port) would resolve it synchronously,
        // past the request's deadline while DNS hangs.
        IPAddress[] addresses = IPAddress.TryParse(md.TcpHost, out IPAddress? literal)
            ? [literal]
            : await Dns.GetHostAddressesAsync(md.TcpHost, ct).ConfigureAwait(false);
        if (addresses.Length == 0)
            throw new SocketException((int)SocketError.HostNotFound);
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
        // Connect with a blocking call on a thread of its own: an async connect would switch the socket to .NET's
        // emulated blocking mode for good. The token closes the socket to abort a connect that hangs.
        using (ct.Register(socket.Dispose))
        {
            try
            {
                await Task.Factory.StartNew(() => socket.Connect(addresses, md.TcpPort), CancellationToken.None,
                    TaskCreationOptions.LongRunning, TaskScheduler.Default).ConfigureAwait(false);
            }
            catch (Exception e) when (ct.IsCancellationRequested && e is SocketException or ObjectDisposedException)
            {
                throw new OperationCanceledException(ct);
            }
            catch
            {
                socket.Dispose();
                throw;
            }
        }
        var conn = new TcpConnection(peer, index, socket);
        new Thread(conn.ReceiveLoop) { IsBackground = true, Name = $"kvf-rx {md.Name}#{index}" }.Start();
        try
        {
            byte[] name = HelloName(agent.Name);
            byte[] hello = new byte[32 + name.Length];
            md.AgentId.TryWriteBytes(hello.AsSpan(0, 16));
            agent.AgentId.TryWriteBytes(hello.AsSpan(16, 16));
            name.CopyTo(hello, 32);
            // Which stream of which connection set this is, and which of the set's streams we abandoned: the target
            // stops their sessions (and this stream's older one) before answering, see docs/transfer.md.
            var header = new FrameHeader
            {
                Type = FrameType.Hello, Flags = FrameHeader.FlagStreams, Chunk = (uint)index,
                RegionKey = peer.ConnectionSet, Aux = abandoned, Length = (uint)hello.Length,
            };
            conn._channel.Send(header, hello); // small: never blocks
            if (await conn._hello.Task.WaitAsync(ct).ConfigureAwait(false) is { } refused)
                throw new TransferException(refused);
        }
        catch
        {
            await conn.AbortAsync("handshake failed").ConfigureAwait(false);
            throw;
        }
        conn._transmitStarted = true;
        new Thread(conn.TransmitLoop) { IsBackground = true, Name = $"kvf-tx {md.Name}#{index}" }.Start();
        return conn;
    }

    /// <summary>The name as a HELLO carries it: UTF-8, cut at a character boundary to what targets accept.</summary>
    internal static byte[] HelloName(string name)
    {
        byte[] bytes = Encoding.UTF8.GetBytes(name);
        if (bytes.Length <= TcpServerSession.MaxHelloNameBytes)
            return bytes;
        int n = TcpServerSession.MaxHelloNameBytes;
        while (n > 0 && (bytes[n] & 0xC0) == 0x80)
            n--; // bytes[n] continues a character: cut before the character starts
        return bytes[..n];
    }

    /// <summary>Queues this connection's stripe of a request (chunks i with i % streams == Index) to the transmit thread.</summary>
    public Task SendStripeAsync(TransferRequest request, int streams, CancellationToken ct)
    {
        var stripe = new Stripe(request, streams, ct);
        if (_fault is { } fault)
        {
            FailStripe(stripe, DescriptorStatus.PeerDisconnected, fault);
            return Task.CompletedTask;
        }
        if (!TryEnqueue(stripe))
        {
            FailStripe(stripe, _fault is null ? DescriptorStatus.Failed : DescriptorStatus.PeerDisconnected,
                _fault ?? $"more than {MaxQueuedStripes} requests are queued on one connection to '{_peer.Remote.Name}': wait for some to finish");
            return Task.CompletedTask;
        }
        return stripe.Done.Task;
    }

    /// <summary>Queues a job unless the queue is full or the transmit thread has exited (it never strands a job).</summary>
    private bool TryEnqueue(Job job)
    {
        lock (_queueLock)
        {
            if (_transmitExited || _queued >= MaxQueuedStripes)
                return false;
            _queued++;
            _queue.Enqueue(job);
        }
        _queueSignal.Release();
        return true;
    }

    private void TransmitLoop()
    {
        try
        {
            while (true)
            {
                _queueSignal.Wait();
                if (!_queue.TryDequeue(out var job))
                    return; // woken by Break with nothing queued: the connection is done
                Run(job);
            }
        }
        finally
        {
            // Close the queue, then fail whatever is still in it, so no job's caller waits for a thread that is gone.
            lock (_queueLock)
                _transmitExited = true;
            while (_queue.TryDequeue(out var left))
                Run(left);
            _transmitStopped.TrySetResult();
        }
    }

    private void Run(Job job)
    {
        try
        {
            if (job is Stripe stripe)
                Transmit(stripe);
            else
                Transmit((Control)job);
        }
        catch (Exception e)
        {
            // A bug must not take the process down from a raw thread: fail the connection with the reason.
            Break($"transmit thread failed: {e.Message}");
            if (job is Stripe failed)
                FailStripe(failed, DescriptorStatus.Failed, _fault!);
        }
        finally
        {
            lock (_queueLock)
                _queued--;
            job.Done.TrySetResult();
        }
    }

    private void Transmit(Stripe stripe)
    {
        var request = stripe.Request;
        var chunks = request.Chunks;
        var regions = request.Remote.Metadata.Regions;
        var checksum = request.Options.Checksum;
        var faults = _peer.Backend.Agent.Options.Faults;
        for (int i = Index; i < chunks.Length; i += stripe.Streams)
        {
            if (stripe.Ct.IsCancellationRequested)
                return; // deadline or cancel: the agent settles what is left
            if (request.IsSettled(i))
                continue;
            if (_fault is { } fault)
            {
                request.Settle(i, DescriptorStatus.PeerDisconnected, fault);
                continue;
            }
            var c = chunks[i];
            var region = regions[c.RemoteRegion];
            bool write = request.Op == TransferOp.Write;
            var h = new FrameHeader
            {
                Type = write ? FrameType.Write : FrameType.ReadRequest,
                RequestId = request.PostId,
                Chunk = (uint)i,
                RegionId = region.Id,
                RegionKey = region.Key.Value,
                Offset = c.RemoteOffset,
                Length = (uint)c.Length,
            };
            if (checksum != ChecksumKind.None)
            {
                h.Flags = FrameHeader.FlagChecksum;
                h.ChecksumKind = checksum;
                if (write)
                    h.Checksum = Checksums.Compute(checksum, c.Local, c.Length);
            }
            try
            {
                if (!write)
                    _channel.Send(h, ReadOnlySpan<byte>.Empty);
                else if (faults?.ShouldCorrupt() == true)
                    _channel.Send(h, TransferFaults.Corrupted(c.Local, c.Length));
                else
                    _channel.Send(h, c.Local, c.Length);
                if (write)
                    _peer.Backend.Agent.CountBytes(BackendKind.Tcp, (uint)c.Length, received: false);
            }
            catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
            {
                Break($"sending to '{_peer.Remote.Name}' failed: {e.Message}");
                request.Settle(i, DescriptorStatus.PeerDisconnected, _fault);
            }
        }
    }

    private void Transmit(Control control)
    {
        if (_fault is null)
        {
            try
            {
                _channel.Send(control.Header, control.Payload.Span);
                return;
            }
            catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
            {
                Break($"sending to '{_peer.Remote.Name}' failed: {e.Message}");
            }
        }
        _peer.FailControl(control.Header.RequestId, _fault!);
    }

    private void FailStripe(Stripe stripe, DescriptorStatus status, string why)
    {
        for (int i = Index; i < stripe.Request.Chunks.Length; i += stripe.Streams)
            stripe.Request.Settle(i, status, why);
    }

    /// <summary>Sends a control frame (notification, fence) after what is already queued, and waits for its acknowledgement.</summary>
    public async Task<(WireStatus Status, string? Error)> ControlAsync(FrameType type, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        var (id, pending) = _peer.NewControl(Index);
        try
        {
            if (_fault is { } fault)
                return (WireStatus.Internal, fault);
            if (!TryEnqueue(new Control(new FrameHeader { Type = type, RequestId = id, Length = (uint)payload.Length }, payload)))
                return (WireStatus.Internal, _fault ?? $"more than {MaxQueuedStripes} requests are queued on one connection to '{_peer.Remote.Name}'");
            return await pending.Task.WaitAsync(ct).ConfigureAwait(false);
        }
        finally
        {
            _peer.EndControl(id);
        }
    }

    private void ReceiveLoop()
    {
        string reason = ReceiveFrames();
        Break(reason);
        // Only now, with this thread done writing into local memory, fail what was waiting on the connection.
        _peer.OnConnectionBroken(this, _fault ?? reason);
        _receiveStopped.TrySetResult();
    }

    /// <summary>
    /// Receives until the connection ends and returns why. Every way out returns here, so the caller always fails what
    /// waited on the connection and marks the thread stopped (an ERROR frame included: AbortAsync waits for that mark).
    /// </summary>
    private string ReceiveFrames()
    {
        string reason;
        try
        {
            _channel.ReceiveTimeout = _peer.Backend.Agent.Options.ConnectTimeout;
            var reply = _channel.ReadHeader();
            _channel.ReceiveTimeout = TimeSpan.Zero;
            if (reply.Type == FrameType.Error)
            {
                reason = $"agent '{_peer.Remote.Name}' refused the connection: {ReadError(reply)}";
                _hello.TrySetResult(reason);
                return reason;
            }
            if (reply.Type != FrameType.HelloOk)
                throw new InvalidDataException($"expected HELLO_OK from '{_peer.Remote.Name}', got {reply.Type}");
            _hello.TrySetResult(null);
            while (true)
            {
                var h = _channel.ReadHeader();
                switch (h.Type)
                {
                    case FrameType.WriteAck:
                        if (_peer.FindRequest(h.RequestId) is { } acked)
                        {
                            CheckReply(acked, h, TransferOp.Write);
                            acked.Settle((int)h.Chunk, Map(h.Status), FrameHeader.Describe(h.Status));
                        }
                        break;
                    case FrameType.ReadData:
                        OnReadData(h);
                        break;
                    case FrameType.NotifyAck:
                    case FrameType.FenceAck:
                        _peer.CompleteControl(h.RequestId, h.Status);
                        break;
                    case FrameType.Error:
                        return $"agent '{_peer.Remote.Name}' closed the connection: {ReadError(h)}";
                    default:
                        throw new InvalidDataException($"unexpected frame {h.Type} from the target");
                }
            }
        }
        catch (Exception e)
        {
            // Any failure, including a target that breaks the protocol, ends this connection, never the process.
            reason = _fault ?? $"connection to '{_peer.Remote.Name}' lost: {e.Message}";
        }
        finally
        {
            _hello.TrySetResult(_fault ?? "the connection closed during the handshake");
        }
        return reason;
    }

    private void OnReadData(FrameHeader h)
    {
        var request = _peer.FindRequest(h.RequestId);
        if (request is not null)
            CheckReply(request, h, TransferOp.Read);
        if (request is null || request.IsSettled((int)h.Chunk))
        {
            // A reply to a post that already ended (timed out, cancelled): keep the stream in frame, touch nothing.
            _channel.Drain((int)h.Length);
            return;
        }
        var c = request.Chunks[h.Chunk];
        if (h.Status != WireStatus.Ok)
        {
            _channel.Drain((int)h.Length);
            request.Settle((int)h.Chunk, Map(h.Status), FrameHeader.Describe(h.Status));
            return;
        }
        if (h.Length != (uint)c.Length)
            throw new InvalidDataException($"READ_DATA for chunk {h.Chunk} carries {h.Length} bytes, {c.Length} were asked for");
        _channel.Receive(c.Local, c.Length);
        _peer.Backend.Agent.CountBytes(BackendKind.Tcp, (uint)c.Length, received: true);
        // A READ that asked for a checksum counts as verified only by one of that kind: a reply without it (a target
        // that ignores the flag, or a flipped flag bit) must not pass as Done.
        var wanted = request.Options.Checksum;
        if (wanted != ChecksumKind.None && (!h.HasChecksum || h.ChecksumKind != wanted))
            request.Settle((int)h.Chunk, DescriptorStatus.ChecksumMismatch, $"the target sent no {wanted} checksum with the data: it cannot be verified");
        else if (h.HasChecksum && Checksums.Compute(h.ChecksumKind, c.Local, c.Length) != h.Checksum)
            request.Settle((int)h.Chunk, DescriptorStatus.ChecksumMismatch, FrameHeader.Describe(WireStatus.ChecksumMismatch));
        else
            request.Settle((int)h.Chunk, DescriptorStatus.Done);
    }

    /// <summary>
    /// A reply must name a chunk of that request that this connection carries, and match its direction, or the target is
    /// broken or hostile. A chunk of another connection's stripe must not land through this one: aborting a request
    /// closes only the connections of its stripes, so this thread could still be writing it after the post returned.
    /// </summary>
    private void CheckReply(TransferRequest request, in FrameHeader h, TransferOp expected)
    {
        if (request.Op != expected)
            throw new InvalidDataException($"the target sent {h.Type} for a {request.Op} request");
        if (h.Chunk >= (uint)request.Chunks.Length)
            throw new InvalidDataException($"the target sent {h.Type} for chunk {h.Chunk} of a {request.Chunks.Length}-chunk request");
        if (request.BackendState is int streams && h.Chunk % (uint)streams != (uint)Index)
            throw new InvalidDataException($"the target sent {h.Type} for chunk {h.Chunk} on connection {Index}, which does not carry it");
    }

    private string ReadError(FrameHeader h)
    {
        if (h.Length is 0 or > 64 * 1024)
            return "(no reason given)";
        return Encoding.UTF8.GetString(_channel.ReceiveSmall((int)h.Length));
    }

    private static DescriptorStatus Map(WireStatus s) => s switch
    {
        WireStatus.Ok => DescriptorStatus.Done,
        WireStatus.UnknownRegion or WireStatus.KeyMismatch or WireStatus.OutOfRange => DescriptorStatus.Refused,
        WireStatus.ChecksumMismatch => DescriptorStatus.ChecksumMismatch,
        _ => DescriptorStatus.Failed,
    };

    /// <summary>Marks the connection broken and fails everything that was waiting on it.</summary>
    private void Break(string reason)
    {
        if (Interlocked.CompareExchange(ref _fault, reason, null) != null)
            return;
        _channel.Abort(); // the receive thread wakes, exits, and then fails what waited on this connection
        _queueSignal.Release(); // wake the transmit thread: it fails what is queued and exits
    }

    /// <summary>Closes the socket and waits until the receive thread can no longer write into local memory.</summary>
    public async Task AbortAsync(string reason)
    {
        Break(reason);
        await _receiveStopped.Task.ConfigureAwait(false);
        if (_transmitStarted)
            await _transmitStopped.Task.ConfigureAwait(false);
        _channel.Dispose();
    }
}
