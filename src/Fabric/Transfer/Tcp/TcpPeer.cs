using System.Collections.Concurrent;

namespace KvFabric.Transfer.Tcp;

/// <summary>The connections to one remote agent (one per stream, opened on demand) and what is in flight on them.</summary>
internal sealed class TcpPeer(TcpBackend backend, RemoteAgent remote)
{
    public const int MaxStreams = 16;
    private readonly TcpConnection?[] _connections = new TcpConnection?[MaxStreams];
    private readonly SemaphoreSlim _connectLock = new(1, 1);
    private readonly ConcurrentDictionary<ulong, TransferRequest> _inflight = new();
    private readonly ConcurrentDictionary<ulong, (int Connection, TaskCompletionSource<(WireStatus, string?)> Done)> _control = new();
    private long _nextControlId;
    private bool _disposed;

    /// <summary>Names this peer view's connections at the target, so a reconnect supersedes only its own abandoned ones.</summary>
    public ulong ConnectionSet { get; } = (ulong)Random.Shared.NextInt64(1, long.MaxValue);

    public TcpBackend Backend { get; } = backend;
    public RemoteAgent Remote { get; } = remote;

    public async Task<TcpConnection> GetConnectionAsync(int index, CancellationToken ct)
    {
        if (_connections[index] is { IsHealthy: true } ready)
            return ready;
        await _connectLock.WaitAsync(ct).ConfigureAwait(false);
        try
        {
            if (_connections[index] is { IsHealthy: true } raced)
                return raced;
            if (_connections[index] is { } broken)
                await broken.AbortAsync("replaced").ConfigureAwait(false);
            if (Remote.Unloaded || _disposed)
                throw new TransferException($"remote agent '{Remote.Name}' was unloaded");
            using var timeout = CancellationTokenSource.CreateLinkedTokenSource(ct);
            timeout.CancelAfter(Backend.Agent.Options.ConnectTimeout);
            // The streams whose connection we closed (a deadline, a cancellation, a failure) and have not replaced: the
            // target stops their sessions before it accepts this one, so none of their late bytes can land after it.
            uint abandoned = 0;
            for (int i = 0; i < _connections.Length; i++)
            {
                if (i != index && _connections[i] is { IsHealthy: false })
                    abandoned |= 1u << i;
            }
            var conn = await TcpConnection.ConnectAsync(this, index, abandoned, timeout.Token).ConfigureAwait(false);
            _connections[index] = conn;
            return conn;
        }
        finally
        {
            _connectLock.Release();
        }
    }

    public void Track(TransferRequest request) => _inflight[request.PostId] = request;
    public void Untrack(TransferRequest request) => _inflight.TryRemove(request.PostId, out _);
    public TransferRequest? FindRequest(ulong postId) => _inflight.GetValueOrDefault(postId);

    public (ulong Id, TaskCompletionSource<(WireStatus, string?)> Done) NewControl(int connection)
    {
        ulong id = (ulong)Interlocked.Increment(ref _nextControlId);
        var tcs = new TaskCompletionSource<(WireStatus, string?)>(TaskCreationOptions.RunContinuationsAsynchronously);
        _control[id] = (connection, tcs);
        return (id, tcs);
    }

    public void EndControl(ulong id) => _control.TryRemove(id, out _);

    public void FailControl(ulong id, string reason)
    {
        if (_control.TryGetValue(id, out var c))
            c.Done.TrySetResult((WireStatus.Internal, reason));
    }

    public void CompleteControl(ulong id, WireStatus status)
    {
        if (_control.TryGetValue(id, out var c))
            c.Done.TrySetResult((status, status == WireStatus.Ok ? null : FrameHeader.Describe(status)));
    }

    /// <summary>Fails the chunks and control calls that were waiting on a broken connection.</summary>
    public void OnConnectionBroken(TcpConnection connection, string reason)
    {
        foreach (var request in _inflight.Values)
        {
            // A request striped over fewer connections has no chunk on this one: its chunks at these indices are
            // another connection's, whose receive thread may be writing them right now.
            if (request.BackendState is not int streams || connection.Index >= streams)
                continue;
            for (int i = connection.Index; i < request.Chunks.Length; i += streams)
                request.Settle(i, DescriptorStatus.PeerDisconnected, reason);
        }
        foreach (var c in _control.Values)
        {
            if (c.Connection == connection.Index)
                c.Done.TrySetResult((WireStatus.Internal, reason));
        }
    }

    /// <summary>Aborts the connections a request used and waits until none can touch its memory.</summary>
    public async Task AbortAsync(int streams, string reason)
    {
        for (int i = 0; i < streams; i++)
        {
            if (_connections[i] is { } conn)
                await conn.AbortAsync(reason).ConfigureAwait(false);
        }
    }

    public async ValueTask DisposeAsync()
    {
        // Under the connect lock, so a connect in flight cannot install a connection after this.
        await _connectLock.WaitAsync().ConfigureAwait(false);
        try
        {
            _disposed = true;
            for (int i = 0; i < _connections.Length; i++)
            {
                if (_connections[i] is { } conn)
                    await conn.AbortAsync("agent shutting down").ConfigureAwait(false);
                _connections[i] = null;
            }
        }
        finally
        {
            _connectLock.Release();
        }
    }
}
