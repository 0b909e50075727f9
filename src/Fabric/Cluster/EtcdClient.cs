using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Cluster.Etcd.Pb;

namespace KvFabric.Cluster;

/// <summary>
/// A minimal etcd v3 client over KvFabric's own gRPC channel (h2c or TLS): KV Range/Put/DeleteRange/Compact, Lease
/// Grant/Revoke/KeepAlive and Watch streams. Failures to reach etcd surface as <see cref="ClusterStoreUnavailableException"/>
/// naming the endpoint and how to start etcd; other errors keep etcd's status (RpcException). Thread-safe.
/// </summary>
public sealed class EtcdClient : IDisposable
{
    private const string Kv = "/etcdserverpb.KV/";
    private const string LeaseSvc = "/etcdserverpb.Lease/";
    private const string WatchSvc = "/etcdserverpb.Watch/";
    private readonly RpcChannel _channel;

    /// <param name="endpoint">etcd's client URL, e.g. http://127.0.0.1:2379.</param>
    /// <param name="callDeadline">The deadline of each unary call (default 5 s).</param>
    public EtcdClient(Uri endpoint, TimeSpan? callDeadline = null)
    {
        ArgumentNullException.ThrowIfNull(endpoint);
        if (endpoint.Scheme is not ("http" or "https"))
            throw new ArgumentException($"etcd endpoint must be http://host:port (or https://); got {endpoint}", nameof(endpoint));
        Endpoint = endpoint;
        _channel = new RpcChannel(new RpcChannelOptions
        {
            Address = endpoint,
            DefaultDeadline = callDeadline ?? TimeSpan.FromSeconds(5),
            MaxRetries = 2,
            RetryBackoff = TimeSpan.FromMilliseconds(100),
        });
    }

    public Uri Endpoint { get; }

    /// <summary>The endpoint as people write it: "http://host:port".</summary>
    public string EndpointText => Endpoint.GetLeftPart(UriPartial.Authority);

    public Task<RangeResponse> RangeAsync(RangeRequest request, CancellationToken cancellationToken = default) =>
        Call(Kv + "Range", request, RangeResponse.Parser, cancellationToken, idempotent: true);

    /// <summary>All keys starting with <paramref name="prefix"/>, in key order.</summary>
    public Task<RangeResponse> RangePrefixAsync(string prefix, CancellationToken cancellationToken = default)
    {
        byte[] key = ClusterKeys.Utf8(prefix);
        return RangeAsync(new RangeRequest { Key = ByteString.CopyFrom(key), RangeEnd = ByteString.CopyFrom(ClusterKeys.PrefixEnd(key)) }, cancellationToken);
    }

    /// <summary>Puts a key (under a lease when lease is not 0). Throws RpcException NotFound when the lease does not exist.</summary>
    public Task<PutResponse> PutAsync(string key, ReadOnlySpan<byte> value, long lease = 0, CancellationToken cancellationToken = default) =>
        Call(Kv + "Put", new PutRequest { Key = ByteString.CopyFromUtf8(key), Value = ByteString.CopyFrom(value), Lease = lease },
            PutResponse.Parser, cancellationToken, idempotent: true);

    public Task<DeleteRangeResponse> DeleteAsync(string key, CancellationToken cancellationToken = default) =>
        Call(Kv + "DeleteRange", new DeleteRangeRequest { Key = ByteString.CopyFromUtf8(key) }, DeleteRangeResponse.Parser,
            cancellationToken, idempotent: true);

    public Task<DeleteRangeResponse> DeletePrefixAsync(string prefix, CancellationToken cancellationToken = default)
    {
        byte[] key = ClusterKeys.Utf8(prefix);
        return Call(Kv + "DeleteRange", new DeleteRangeRequest { Key = ByteString.CopyFrom(key), RangeEnd = ByteString.CopyFrom(ClusterKeys.PrefixEnd(key)) },
            DeleteRangeResponse.Parser, cancellationToken, idempotent: true);
    }

    /// <summary>Compacts the key-value history up to <paramref name="revision"/> (older revisions can no longer be watched).</summary>
    public Task<CompactionResponse> CompactAsync(long revision, CancellationToken cancellationToken = default) =>
        Call(Kv + "Compact", new CompactionRequest { Revision = revision, Physical = true }, CompactionResponse.Parser, cancellationToken, idempotent: true);

    /// <summary>Grants a lease of <paramref name="ttl"/> (whole seconds, rounded up; etcd may raise it to its minimum).</summary>
    public async Task<LeaseGrantResponse> LeaseGrantAsync(TimeSpan ttl, CancellationToken cancellationToken = default)
    {
        var request = new LeaseGrantRequest { TTL = (long)Math.Ceiling(ttl.TotalSeconds) };
        // A retried grant can leave an unused lease behind; it holds no keys and expires by itself.
        LeaseGrantResponse response = await Call(LeaseSvc + "LeaseGrant", request, LeaseGrantResponse.Parser, cancellationToken, idempotent: true)
            .ConfigureAwait(false);
        if (!string.IsNullOrEmpty(response.Error))
            throw new InvalidOperationException($"etcd at {EndpointText} refused a lease of {request.TTL} s: {response.Error}");
        return response;
    }

    /// <summary>Revokes a lease, deleting its keys. A lease that does not exist (any more) is not an error.</summary>
    public async Task LeaseRevokeAsync(long lease, CancellationToken cancellationToken = default)
    {
        try
        {
            await Call(LeaseSvc + "LeaseRevoke", new LeaseRevokeRequest { ID = lease }, LeaseRevokeResponse.Parser, cancellationToken, idempotent: true)
                .ConfigureAwait(false);
        }
        catch (RpcException e) when (e.Status == StatusCode.NotFound)
        {
            // already gone
        }
    }

    /// <summary>
    /// Renews a lease once (one short LeaseKeepAlive stream: one request, one response, half-close). Returns the TTL etcd
    /// reports: 0 when the lease no longer exists.
    /// </summary>
    public async Task<long> LeaseKeepAliveOnceAsync(long lease, CancellationToken cancellationToken = default)
    {
        try
        {
            await using var call = _channel.Streaming<LeaseKeepAliveRequest, LeaseKeepAliveResponse>(LeaseSvc + "LeaseKeepAlive",
                LeaseKeepAliveResponse.Parser, new CallOptions(CancellationToken: cancellationToken));
            await call.WriteAsync(new LeaseKeepAliveRequest { ID = lease }).ConfigureAwait(false);
            await call.CompleteAsync().ConfigureAwait(false);
            LeaseKeepAliveResponse response = await call.ReadAsync().ConfigureAwait(false)
                ?? throw new RpcException(StatusCode.Internal, $"etcd at {EndpointText} ended LeaseKeepAlive without a response");
            await call.ReadToEndAsync().ConfigureAwait(false);
            return response.TTL;
        }
        catch (RpcException e) when (IsUnreachable(e) && !cancellationToken.IsCancellationRequested)
        {
            throw Unavailable("LeaseKeepAlive", e);
        }
    }

    /// <summary>Opens a Watch stream (no deadline): write create/cancel requests, read responses until cancelled.</summary>
    public GrpcCall<WatchRequest, WatchResponse> OpenWatch(CancellationToken cancellationToken) =>
        _channel.Streaming<WatchRequest, WatchResponse>(WatchSvc + "Watch", WatchResponse.Parser,
            new CallOptions(Deadline: Timeout.InfiniteTimeSpan, CancellationToken: cancellationToken));

    /// <summary>True for failures that mean etcd could not be reached (down, wrong port, connection cut).</summary>
    public static bool IsUnreachable(RpcException e) => e.Status is StatusCode.Unavailable or StatusCode.DeadlineExceeded;

    /// <summary>The error for an etcd that cannot be reached: names the endpoint and how to start one.</summary>
    public ClusterStoreUnavailableException Unavailable(string what, Exception inner) =>
        new($"etcd at {EndpointText} cannot be reached ({(inner is RpcException r ? r.Detail : what + ": " + inner.Message)}). " +
            $"Start etcd there (Debian: apt-get install etcd-server; e.g. etcd --data-dir /var/lib/kvfabric-etcd --listen-client-urls {EndpointText} " +
            $"--advertise-client-urls {EndpointText}; see docs/cluster.md) or point KvFabric at a running etcd.", inner);

    private async Task<TResponse> Call<TRequest, TResponse>(string method, TRequest request, MessageParser<TResponse> parser,
        CancellationToken cancellationToken, bool idempotent)
        where TRequest : IMessage<TRequest> where TResponse : class, IMessage<TResponse>
    {
        try
        {
            return await _channel.UnaryAsync(method, request, parser, new CallOptions(CancellationToken: cancellationToken), idempotent)
                .ConfigureAwait(false);
        }
        catch (RpcException e) when (IsUnreachable(e) && !cancellationToken.IsCancellationRequested)
        {
            throw Unavailable(method.TrimStart('/'), e);
        }
    }

    public void Dispose() => _channel.Dispose();
}
