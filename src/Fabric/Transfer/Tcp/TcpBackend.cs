using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using KvFabric.Memory;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// Transfers over TCP: reaches any peer with a routable endpoint, host memory of any kind on both sides. Large requests
/// are striped chunk by chunk over several connections. Also the agent's control channel (notifications, fences).
/// </summary>
internal sealed class TcpBackend : ITransferBackend
{
    private readonly Socket _listener;
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<TcpServerSession, Thread> _sessions = new();
    private readonly Task _acceptLoop;

    public TcpBackend(TransferAgent agent)
    {
        Agent = agent;
        var options = agent.Options;
        _listener = new Socket(options.ListenAddress.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            _listener.Bind(new IPEndPoint(options.ListenAddress, options.ListenPort));
            _listener.Listen(512);
        }
        catch (SocketException e)
        {
            _listener.Dispose();
            throw new TransferException($"cannot listen on {options.ListenAddress}:{options.ListenPort} ({e.SocketErrorCode}): pick another port or 0 for any free one");
        }
        LocalEndPoint = (IPEndPoint)_listener.LocalEndPoint!;
        _acceptLoop = Task.Run(AcceptLoopAsync);
    }

    public TransferAgent Agent { get; }
    public IPEndPoint LocalEndPoint { get; }
    public BackendKind Kind => BackendKind.Tcp;

    public bool CanReach(RemoteAgent remote, ReadOnlySpan<int> remoteRegions, out string? why)
    {
        foreach (int r in remoteRegions)
        {
            if (remote.Metadata.Regions[r].Kind == MemoryKind.Device)
            {
                why = $"remote region {remote.Metadata.Regions[r].Id} is device memory, which the TCP backend cannot address (needs a CUDA-aware backend)";
                return false;
            }
        }
        why = null;
        return true;
    }

    private TcpPeer Peer(RemoteAgent remote)
    {
        if (remote.TcpState is TcpPeer p)
            return p;
        var created = new TcpPeer(this, remote);
        return Interlocked.CompareExchange(ref remote.TcpState, created, null) as TcpPeer ?? created;
    }

    public async Task StartAsync(TransferRequest request, CancellationToken ct)
    {
        var peer = Peer(request.Remote);
        int streams = Math.Min(request.Streams, request.Chunks.Length);
        request.BackendState = streams;
        peer.Track(request);
        var connections = new TcpConnection[streams];
        for (int s = 0; s < streams; s++)
        {
            try
            {
                connections[s] = await peer.GetConnectionAsync(s, ct).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (ct.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e) when (e is SocketException or IOException or TransferException or InvalidDataException or OperationCanceledException)
            {
                string why = e is OperationCanceledException
                    ? $"connecting to '{request.Remote.Name}' at {request.Remote.Metadata.TcpHost}:{request.Remote.Metadata.TcpPort} timed out"
                    : $"cannot connect to '{request.Remote.Name}' at {request.Remote.Metadata.TcpHost}:{request.Remote.Metadata.TcpPort}: {e.Message}";
                request.SettleAllPending(DescriptorStatus.PeerDisconnected, why);
                return;
            }
        }
        var senders = new Task[streams];
        for (int s = 0; s < streams; s++)
            senders[s] = connections[s].SendStripeAsync(request, streams, ct);
        await Task.WhenAll(senders).ConfigureAwait(false);
    }

    public void Finish(TransferRequest request)
    {
        if (request.Remote.TcpState is TcpPeer peer)
            peer.Untrack(request);
    }

    public async Task<string?> AbortAsync(TransferRequest request)
    {
        // Waits (unbounded) until the receive and transmit threads stopped: after that nothing touches the memory.
        if (request.Remote.TcpState is TcpPeer peer)
            await peer.AbortAsync(request.BackendState is int s ? s : TcpPeer.MaxStreams, "the request's deadline passed or it was cancelled").ConfigureAwait(false);
        return null;
    }

    /// <summary>Sends a control frame to a peer over its first connection and waits for the acknowledgement.</summary>
    public async Task<(WireStatus Status, string? Error)> ControlAsync(RemoteAgent remote, FrameType type, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        TcpConnection conn;
        try
        {
            conn = await Peer(remote).GetConnectionAsync(0, ct).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (!ct.IsCancellationRequested)
        {
            return (WireStatus.Internal, $"connecting to '{remote.Name}' timed out after {Agent.Options.ConnectTimeout.TotalSeconds:0.#} s");
        }
        catch (Exception e) when (e is SocketException or IOException or TransferException or InvalidDataException)
        {
            return (WireStatus.Internal, $"cannot reach '{remote.Name}': {e.Message}");
        }
        return await conn.ControlAsync(type, payload, ct).ConfigureAwait(false);
    }

    public async ValueTask ForgetAsync(RemoteAgent remote)
    {
        if (Interlocked.Exchange(ref remote.TcpState, null) is TcpPeer peer)
            await peer.DisposeAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// Aborts the sessions of <paramref name="newer"/>'s initiator and connection set whose stream is in
    /// <paramref name="streams"/> and waits, up to <paramref name="wait"/>, until their threads ended: after that none
    /// of them can land a byte. Returns null when all stopped, else how many did not.
    /// </summary>
    internal int? StopSuperseded(TcpServerSession newer, uint streams, TimeSpan wait)
    {
        List<Thread>? stopping = null;
        foreach (var (session, thread) in _sessions)
        {
            if (session != newer && session.Identified && session.Stream >= 0 && (streams & (1u << session.Stream)) != 0
                && session.PeerId == newer.PeerId && session.ConnectionSet == newer.ConnectionSet)
            {
                session.Abort();
                (stopping ??= []).Add(thread);
            }
        }
        if (stopping is null)
            return null;
        var clock = System.Diagnostics.Stopwatch.StartNew();
        int late = 0;
        foreach (var thread in stopping)
        {
            var left = wait - clock.Elapsed;
            if (!thread.Join(left > TimeSpan.Zero ? left : TimeSpan.Zero))
                late++;
        }
        return late == 0 ? null : late;
    }

    private async Task AcceptLoopAsync()
    {
        int failures = 0;
        while (!_stop.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await _listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
                failures = 0;
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                if (_stop.IsCancellationRequested)
                    return;
                // A failure that repeats at once (out of file descriptors: EMFILE) would spin a core: back off, up to 1 s.
                try
                {
                    await Task.Delay(Math.Min(1000, 10 << Math.Min(failures++, 7)), _stop.Token).ConfigureAwait(false);
                }
                catch (OperationCanceledException)
                {
                    return;
                }
                continue;
            }
            if (_sessions.Count >= Agent.Options.MaxInboundConnections)
            {
                socket.Dispose(); // the initiator sees a reset and reports it; the limit bounds our receive threads
                continue;
            }
            var session = new TcpServerSession(this, socket);
            var thread = new Thread(() =>
            {
                try
                {
                    session.Run();
                }
                finally
                {
                    _sessions.TryRemove(session, out _);
                }
            })
            { IsBackground = true, Name = $"kvf-session {Agent.Name}" };
            _sessions[session] = thread;
            thread.Start();
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        _listener.Dispose();
        await _acceptLoop.ConfigureAwait(false);
        foreach (var (session, thread) in _sessions)
        {
            session.Abort();
            thread.Join(TimeSpan.FromSeconds(5));
        }
    }
}
