using System.Runtime.CompilerServices;
using System.Threading.Channels;
using Google.Protobuf;
using Google.Protobuf.Collections;
using KvFabric.Client.Grpc;
using KvFabric.Cluster.Etcd.Pb;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace KvFabric.Cluster;

/// <summary>
/// The cluster store on an etcd v3 server (gRPC API, h2c on its client URL), through <see cref="EtcdClient"/>. Nodes are
/// keys /kvfabric/&lt;cluster&gt;/nodes/&lt;node&gt; holding <see cref="NodeInfoCodec"/> JSON, put under a lease per
/// registration. Watches list the prefix, then watch it from the next revision; when the stream breaks (etcd restarted,
/// connection cut) or the start revision was compacted away, they list again, emit the differences and watch on.
/// </summary>
public sealed class EtcdClusterStore : IClusterStore
{
    private static readonly TimeSpan MaxBackoff = TimeSpan.FromSeconds(2);
    private readonly EtcdClient _client;
    private readonly string _prefix;
    private readonly ILogger _log;
    private readonly CancellationTokenSource _disposed = new();
    private readonly HashSet<Registration> _registrations = [];

    /// <param name="endpoint">etcd's client URL, e.g. http://127.0.0.1:2379.</param>
    /// <param name="cluster">The cluster's name: clusters sharing one etcd do not see each other.</param>
    public EtcdClusterStore(Uri endpoint, string cluster, ILogger? log = null, TimeSpan? callDeadline = null)
    {
        _prefix = ClusterKeys.NodesPrefix(cluster);
        Cluster = cluster;
        _client = new EtcdClient(endpoint, callDeadline);
        _log = log ?? NullLogger.Instance;
    }

    public string Cluster { get; }

    public EtcdClient Client => _client;

    public string Description => $"etcd at {_client.EndpointText} (cluster {Cluster})";

    /// <summary>Test hook: runs after each listing of a watch, with the listed revision, before the watch stream is created.</summary>
    internal Func<long, CancellationToken, Task>? BeforeWatchCreate { get; set; }

    public async Task<IClusterRegistration> RegisterAsync(NodeInfo self, TimeSpan ttl, CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed.IsCancellationRequested, this);
        var registration = new Registration(this, self, ttl);
        await registration.StartAsync(cancellationToken).ConfigureAwait(false);
        lock (_registrations)
            _registrations.Add(registration);
        _log.LogInformation("cluster: node {Node} registered in {Store} under lease {Lease} (TTL {Ttl})",
            self.Node, Description, registration.LeaseId, registration.Ttl);
        return registration;
    }

    public async Task<IReadOnlyList<NodeInfo>> ListAsync(CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed.IsCancellationRequested, this);
        RangeResponse range = await _client.RangePrefixAsync(_prefix, cancellationToken).ConfigureAwait(false);
        return [.. Decode(range.Kvs).Values];
    }

    public async IAsyncEnumerable<MembershipChange> WatchAsync([EnumeratorCancellation] CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed.IsCancellationRequested, this);
        var changes = WatchChannel.Create(singleWriter: true);
        using var both = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken, _disposed.Token);
        Task pump = Task.Run(() => PumpAsync(changes.Writer, both.Token), CancellationToken.None);
        try
        {
            await foreach (MembershipChange change in WatchChannel.ReadAsync(changes.Reader, cancellationToken, _disposed.Token).ConfigureAwait(false))
                yield return change;
        }
        finally
        {
            await both.CancelAsync().ConfigureAwait(false);
            await pump.ConfigureAwait(false); // the pump never throws: it completes the channel with its failure
        }
    }

    private async Task PumpAsync(ChannelWriter<MembershipChange> writer, CancellationToken cancellationToken)
    {
        var known = new SortedDictionary<string, NodeInfo>(StringComparer.Ordinal);
        bool listedOnce = false;
        bool outageLogged = false;
        TimeSpan backoff = TimeSpan.FromMilliseconds(200);
        try
        {
            while (true)
            {
                cancellationToken.ThrowIfCancellationRequested();
                try
                {
                    RangeResponse range = await _client.RangePrefixAsync(_prefix, cancellationToken).ConfigureAwait(false);
                    if (outageLogged)
                    {
                        _log.LogInformation("cluster: watch of {Store} reconnected at revision {Revision}", Description, range.Header.Revision);
                        outageLogged = false;
                    }

                    Reconcile(known, Decode(range.Kvs), writer);
                    listedOnce = true;
                    backoff = TimeSpan.FromMilliseconds(200);

                    if (BeforeWatchCreate is { } hook)
                        await hook(range.Header.Revision, cancellationToken).ConfigureAwait(false);
                    await WatchFromAsync(range.Header.Revision + 1, known, writer, cancellationToken).ConfigureAwait(false);
                }
                catch (Exception e) when (!cancellationToken.IsCancellationRequested && listedOnce && e is ClusterStoreUnavailableException or RpcException)
                {
                    if (!outageLogged)
                    {
                        _log.LogWarning("cluster: watch of {Store} lost its connection ({Error}); retrying (backoff up to {Max})",
                            Description, e.Message, MaxBackoff);
                        outageLogged = true;
                    }
                }

                await Task.Delay(backoff, cancellationToken).ConfigureAwait(false);
                backoff = TimeSpan.FromTicks(Math.Min(backoff.Ticks * 2, MaxBackoff.Ticks));
            }
        }
        catch (Exception) when (cancellationToken.IsCancellationRequested)
        {
            writer.TryComplete();
        }
        catch (Exception e)
        {
            writer.TryComplete(e); // the first listing failed (etcd unreachable): the watcher gets the clear error
        }
    }

    /// <summary>Watches the prefix from <paramref name="startRevision"/>; returns when the watch must be re-listed.</summary>
    private async Task WatchFromAsync(long startRevision, SortedDictionary<string, NodeInfo> known, ChannelWriter<MembershipChange> writer,
        CancellationToken cancellationToken)
    {
        byte[] key = ClusterKeys.Utf8(_prefix);
        await using var call = _client.OpenWatch(cancellationToken);
        await call.WriteAsync(new WatchRequest
        {
            CreateRequest = new WatchCreateRequest
            {
                Key = ByteString.CopyFrom(key),
                RangeEnd = ByteString.CopyFrom(ClusterKeys.PrefixEnd(key)),
                StartRevision = startRevision,
            },
        }).ConfigureAwait(false);
        while (await call.ReadAsync().ConfigureAwait(false) is { } response)
        {
            if (response.CompactRevision != 0)
            {
                _log.LogWarning("cluster: watch of {Store} from revision {Start} was compacted away (oldest kept: {Compact}); listing again",
                    Description, startRevision, response.CompactRevision);
                return;
            }

            if (response.Canceled)
            {
                _log.LogWarning("cluster: {Store} cancelled the watch ({Reason}); listing again", Description,
                    string.IsNullOrEmpty(response.CancelReason) ? "no reason given" : response.CancelReason);
                return;
            }

            foreach (Event ev in response.Events)
                Apply(ev, known, writer);
        }

        _log.LogWarning("cluster: {Store} ended the watch stream; listing again", Description);
    }

    // A watcher whose queue overflowed has its watch ended with WatchOverflowException; the pump stops with it.
    private void Emit(ChannelWriter<MembershipChange> writer, MembershipChange change)
    {
        if (!WatchChannel.Emit(writer, change, Description))
            throw new WatchOverflowException($"the watcher of {Description} fell behind");
    }

    private void Apply(Event ev, SortedDictionary<string, NodeInfo> known, ChannelWriter<MembershipChange> writer)
    {
        string name = NameOf(ev.Kv.Key);
        if (ev.Type == Event.Types.EventType.Delete)
        {
            if (known.Remove(name, out NodeInfo? gone))
                Emit(writer, new MembershipChange(MembershipChangeKind.Left, gone));
            return;
        }

        NodeInfo? info = TryDecode(name, ev.Kv.Value);
        if (info is null)
            return;
        if (!known.TryGetValue(name, out NodeInfo? old))
            Emit(writer, new MembershipChange(MembershipChangeKind.Joined, info));
        else if (!old.SameAs(info))
            Emit(writer, new MembershipChange(MembershipChangeKind.Updated, info));
        known[name] = info;
    }

    /// <summary>Emits what changed between what the watcher knew and a fresh listing, and makes the listing what it knows.</summary>
    private void Reconcile(SortedDictionary<string, NodeInfo> known, SortedDictionary<string, NodeInfo> now, ChannelWriter<MembershipChange> writer)
    {
        foreach (var (name, old) in known.Where(k => !now.ContainsKey(k.Key)).ToList())
        {
            known.Remove(name);
            Emit(writer, new MembershipChange(MembershipChangeKind.Left, old));
        }

        foreach (var (name, info) in now)
        {
            if (!known.TryGetValue(name, out NodeInfo? old))
                Emit(writer, new MembershipChange(MembershipChangeKind.Joined, info));
            else if (!old.SameAs(info))
                Emit(writer, new MembershipChange(MembershipChangeKind.Updated, info));
            known[name] = info;
        }
    }

    private SortedDictionary<string, NodeInfo> Decode(RepeatedField<KeyValue> kvs)
    {
        var nodes = new SortedDictionary<string, NodeInfo>(StringComparer.Ordinal);
        foreach (KeyValue kv in kvs)
        {
            string name = NameOf(kv.Key);
            if (TryDecode(name, kv.Value) is { } info)
                nodes[name] = info;
        }

        return nodes;
    }

    private string NameOf(ByteString key)
    {
        string k = key.ToStringUtf8();
        return k.StartsWith(_prefix, StringComparison.Ordinal) ? k[_prefix.Length..] : k;
    }

    private NodeInfo? TryDecode(string name, ByteString value)
    {
        try
        {
            NodeInfo info = NodeInfoCodec.Decode(value.Span);
            return info.Node == name ? info : info with { Node = name };
        }
        catch (FormatException e)
        {
            _log.LogWarning("cluster: ignoring key {Key} in {Store}: {Error}", _prefix + name, Description, e.Message);
            return null;
        }
    }

    /// <summary>Ends the watches, revokes the registrations still open (their nodes leave) and closes the connection.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_disposed.IsCancellationRequested)
            return;
        await _disposed.CancelAsync().ConfigureAwait(false);
        Registration[] open;
        lock (_registrations)
            open = [.. _registrations];
        foreach (Registration r in open)
            await r.DisposeAsync().ConfigureAwait(false);
        _client.Dispose();
    }

    private sealed class Registration(EtcdClusterStore store, NodeInfo self, TimeSpan ttl) : LeasedRegistration(self, ttl, store._log)
    {
        private readonly string _key = ClusterKeys.NodeKey(store.Cluster, self.Node);

        protected override string StoreDescription => store.Description;

        protected override async Task<(long Lease, TimeSpan Ttl)> GrantAsync(TimeSpan ttl, CancellationToken cancellationToken)
        {
            LeaseGrantResponse grant = await store._client.LeaseGrantAsync(ttl, cancellationToken).ConfigureAwait(false);
            return (grant.ID, TimeSpan.FromSeconds(grant.TTL));
        }

        protected override async Task<bool> PutAsync(NodeInfo info, long lease, CancellationToken cancellationToken)
        {
            try
            {
                await store._client.PutAsync(_key, NodeInfoCodec.Encode(info), lease, cancellationToken).ConfigureAwait(false);
                return true;
            }
            catch (RpcException e) when (e.Status == StatusCode.NotFound)
            {
                return false; // "requested lease not found"
            }
        }

        protected override async Task<bool> KeepAliveAsync(long lease, CancellationToken cancellationToken) =>
            await store._client.LeaseKeepAliveOnceAsync(lease, cancellationToken).ConfigureAwait(false) > 0;

        protected override Task RevokeAsync(long lease, CancellationToken cancellationToken) =>
            store._client.LeaseRevokeAsync(lease, cancellationToken);

        protected override ValueTask DisposeCoreAsync()
        {
            lock (store._registrations)
                store._registrations.Remove(this);
            return ValueTask.CompletedTask;
        }
    }
}
