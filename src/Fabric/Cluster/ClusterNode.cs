using System.Collections.Concurrent;
using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Index;
using KvFabric.Rpc;
using KvFabric.Rpc.V1;
using KvFabric.Service;
using KvFabric.Tiers;
using KvFabric.Transfer;
using Microsoft.Extensions.Logging;

namespace KvFabric.Cluster;

/// <summary>What one (node, worker) holds of a chain, by tier, as the cluster index knows it.</summary>
public readonly record struct LocationMatch(string Node, string Worker, int Gpu, int Host, int Ssd)
{
    public int Matched => Gpu + Host + Ssd;
}

/// <summary>The cluster-wide index as the node's services use it: fed by the event feeds, asked by Match, Route and Fetch.</summary>
public interface IClusterIndex : IIndexUpdates
{
    /// <summary>Per (node, worker) holding a prefix of the chain: its length, by tier. Order unspecified.</summary>
    void Match(uint tenant, ReadOnlySpan<BlockHash> chain, List<LocationMatch> output);

    /// <summary>Forgets every block of the node (it left the cluster). Applied in order with the events queued before.</summary>
    ValueTask RemoveNodeAsync(string node, CancellationToken cancellationToken);

    /// <summary>Completes when everything queued so far is applied.</summary>
    Task FlushAsync(CancellationToken cancellationToken);
}

public sealed record ClusterNodeOptions
{
    public required string Node { get; init; }
    public required string Worker { get; init; }
    /// <summary>An admin tenant configured on every node: the nodes call each other as it.</summary>
    public required string ClusterTenant { get; init; }
    public required string ClusterToken { get; init; }
    /// <summary>The tenants whose events are replicated (the same on every node).</summary>
    public required IReadOnlyList<string> Tenants { get; init; }
    public TimeSpan LeaseTtl { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>How often the node's load is republished when it changed.</summary>
    public TimeSpan LoadInterval { get; init; } = TimeSpan.FromSeconds(1);
    /// <summary>Blocks per Export call of a Fetch (also bounded by free staging slots on both sides).</summary>
    public int FetchBatchBlocks { get; init; } = 64;
}

/// <summary>
/// This node's part in the cluster: it registers itself (with its transfer agent's metadata) under a lease in the
/// cluster store and keeps it alive, watches the members, keeps one event feed per (member, tenant) into the cluster
/// index (its own node included, through the same gRPC stream), drops a member's blocks when its lease ends, and serves
/// Route candidates and cross-node Fetch from what it knows. It owns the store and the index it is given (disposes them).
/// </summary>
public sealed class ClusterNode : IAsyncDisposable
{
    private static readonly TimeSpan MinBackoff = TimeSpan.FromMilliseconds(100), MaxBackoff = TimeSpan.FromSeconds(2);
    private static readonly TimeSpan ExportLease = TimeSpan.FromSeconds(30), ExportMargin = TimeSpan.FromSeconds(2);
    private readonly IClusterStore _store;
    private readonly IClusterIndex _index;
    private readonly ClusterNodeOptions _options;
    private readonly TransferAgent _agent;
    private readonly IFabricStore _fabric;
    private readonly StagingArea _staging;
    private readonly Func<double> _load;
    private readonly ILogger _log;
    private readonly ConcurrentDictionary<string, Peer> _peers = new(StringComparer.Ordinal);
    private readonly ConcurrentDictionary<(string Node, uint Tenant), EventSequencer> _sequencers = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly SemaphoreSlim _membership = new(1, 1);
    private IClusterRegistration? _registration;
    private Task? _watch, _loadLoop;
    private double _publishedLoad;
    // Requests this node routed to each member lately, decaying with the load publishing interval: the members' own
    // load reaches the store at most once per interval, so a burst of Routes would otherwise all pick the same member.
    private readonly ConcurrentDictionary<string, (double Value, long Ticks)> _routed = new(StringComparer.Ordinal);
    private string _advertise = string.Empty;
    // Members a listing of the store lacked once (under _membership): a second miss in a row means it left unseen.
    private readonly HashSet<string> _missing = new(StringComparer.Ordinal);
    // (node, endpoint) pairs already reported as unusable (under _membership).
    private readonly HashSet<(string Node, string Endpoint)> _unusable = [];

    public ClusterNode(IClusterStore store, IClusterIndex index, ClusterNodeOptions options, TransferAgent agent, IFabricStore fabric,
        StagingArea staging, Func<double> load, ILogger log)
    {
        _store = store;
        _index = index;
        _options = options;
        _agent = agent;
        _fabric = fabric;
        _staging = staging;
        _load = load;
        _log = log;
        if (options.Tenants.Count == 0)
            throw new ArgumentException("a cluster node needs at least one tenant to replicate", nameof(options));
    }

    private sealed class Peer(NodeInfo info, FabricClient client)
    {
        public NodeInfo Info = info;
        public readonly FabricClient Client = client;
        public readonly CancellationTokenSource Cts = new();
        public readonly List<Task> Feeds = [];
        public readonly SemaphoreSlim AgentLock = new(1, 1);
        public RemoteAgent? Agent;
        public ulong AgentIncarnation;
        public bool Stopped; // under AgentLock
    }

    public FeedCounters Counters { get; } = new();
    public string Node => _options.Node;
    public IClusterIndex Index => _index;
    public string StoreDescription => _store.Description;

    /// <summary>The members this node currently knows to be alive (itself included once registered).</summary>
    public IReadOnlyList<NodeInfo> Members => _peers.Values.Select(p => p.Info).OrderBy(i => i.Node, StringComparer.Ordinal).ToList();

    private NodeInfo SelfInfo(double load) =>
        new(_options.Node, _options.Worker, _advertise, _agent.ExportMetadata(), load, _fabric.Events.Incarnation);

    /// <param name="advertise">The address other nodes call this node's gRPC services at, e.g. "http://127.0.0.1:50051".</param>
    public async Task StartAsync(string advertise, CancellationToken cancellationToken)
    {
        _advertise = advertise;
        _registration = await _store.RegisterAsync(SelfInfo(0), _options.LeaseTtl, cancellationToken).ConfigureAwait(false);
        var selfSeen = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        _watch = Task.Run(() => WatchAsync(selfSeen));
        await selfSeen.Task.WaitAsync(TimeSpan.FromSeconds(30), cancellationToken).ConfigureAwait(false);
        _loadLoop = Task.Run(PublishLoadAsync);
        _log.LogInformation("node {Node} joined the cluster through {Store} (lease {Ttl} s); members: {Members}", _options.Node,
            _store.Description, _options.LeaseTtl.TotalSeconds, string.Join(", ", Members.Select(m => m.Node)));
    }

    private async Task WatchAsync(TaskCompletionSource selfSeen)
    {
        TimeSpan backoff = MinBackoff;
        while (!_stop.IsCancellationRequested)
        {
            try
            {
                await foreach (MembershipChange change in _store.WatchAsync(_stop.Token).ConfigureAwait(false))
                {
                    await ApplyAsync(change).ConfigureAwait(false);
                    if (change.Node.Node == _options.Node && change.Kind != MembershipChangeKind.Left)
                        selfSeen.TrySetResult();
                    backoff = MinBackoff;
                }
            }
            catch (OperationCanceledException) when (_stop.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e)
            {
                _log.LogWarning("watching the cluster members through {Store} failed ({Error}); retrying in {Backoff} ms", _store.Description, e.Message, backoff.TotalMilliseconds);
            }

            try
            {
                await Task.Delay(backoff, _stop.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }

            backoff = TimeSpan.FromTicks(Math.Min(backoff.Ticks * 2, MaxBackoff.Ticks));
        }
    }

    private async Task ApplyAsync(MembershipChange change)
    {
        await _membership.WaitAsync(_stop.Token).ConfigureAwait(false);
        try
        {
            await ApplyLockedAsync(change).ConfigureAwait(false);
        }
        finally
        {
            _membership.Release();
        }
    }

    /// <summary>Applies one change; the caller holds _membership.</summary>
    private async Task ApplyLockedAsync(MembershipChange change)
    {
        NodeInfo info = change.Node;
        if (change.Kind == MembershipChangeKind.Left)
        {
            try
            {
                if (_peers.TryRemove(info.Node, out Peer? gone))
                    await StopPeerAsync(gone).ConfigureAwait(false);
            }
            finally
            {
                foreach (var key in _sequencers.Keys.Where(k => k.Node == info.Node).ToList())
                    _sequencers.TryRemove(key, out _);
                _routed.TryRemove(info.Node, out _);
                _missing.Remove(info.Node);
                // After its feeds stopped, so nothing of it is queued behind the removal.
                await _index.RemoveNodeAsync(info.Node, _stop.Token).ConfigureAwait(false);
            }

            _log.LogWarning("node {Node} left the cluster (its lease ended or it stopped): its blocks left the index and no work is routed to it", info.Node);
            return;
        }

        if (!TryAddress(info.GrpcEndpoint, out Uri? address))
        {
            // One member's bad value must not stop the others' changes (applying this one threw, the watch restarted
            // and stopped at it again, forever; a reconciliation threw and ended the load loop): it is skipped, said once.
            if (_unusable.Add((info.Node, info.GrpcEndpoint)))
                _log.LogError("node {Node} publishes gRPC endpoint '{Endpoint}', which is neither host:port nor an http(s) URL: it is not used (no events, no routing, no fetch) until it publishes a usable one", info.Node, info.GrpcEndpoint);
            return;
        }

        if (_peers.TryGetValue(info.Node, out Peer? known))
        {
            if (known.Info.GrpcEndpoint == info.GrpcEndpoint)
            {
                // Load, metadata or a restart on the same address: the feeds notice a restart themselves (snapshot).
                known.Info = info;
                return;
            }

            _peers.TryRemove(info.Node, out _);
            await StopPeerAsync(known).ConfigureAwait(false);
        }

        StartPeer(info, address);
        if (change.Kind == MembershipChangeKind.Joined && info.Node != _options.Node)
            _log.LogInformation("node {Node} (worker {Worker}) at {Address} is a member", info.Node, info.Worker, info.GrpcEndpoint);
    }

    /// <summary>A member's endpoint as a channel address: an http(s) URL, or host:port (docs/cluster.md), taken as h2c.</summary>
    private static bool TryAddress(string endpoint, [System.Diagnostics.CodeAnalysis.NotNullWhen(true)] out Uri? address)
    {
        string text = endpoint.Contains("://", StringComparison.Ordinal) ? endpoint : "http://" + endpoint;
        return Uri.TryCreate(text, UriKind.Absolute, out address) && address.Scheme is "http" or "https" && address.Host.Length > 0;
    }

    private void StartPeer(NodeInfo info, Uri address)
    {
        var client = new FabricClient(new RpcChannelOptions
        {
            Address = address, Tenant = _options.ClusterTenant, Token = _options.ClusterToken,
        });
        var peer = new Peer(info, client);
        foreach (string tenant in _options.Tenants)
            peer.Feeds.Add(Task.Run(() => FeedAsync(peer, tenant, TenantRegistry.IdOf(tenant), peer.Cts.Token)));
        _peers[info.Node] = peer;
    }

    private async Task StopPeerAsync(Peer peer)
    {
        await peer.Cts.CancelAsync().ConfigureAwait(false);
        try
        {
            await Task.WhenAll(peer.Feeds).WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            _log.LogWarning("the event feeds of node {Node} did not stop within 10 s", peer.Info.Node);
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // Feeds end by cancellation; one that failed otherwise was logged where it failed. Stopping goes on.
        }

        await peer.AgentLock.WaitAsync().ConfigureAwait(false);
        try
        {
            peer.Stopped = true; // no Fetch loads an agent for it from now on
            if (peer.Agent is { } remote)
                await _agent.UnloadRemoteAsync(remote).ConfigureAwait(false);
            peer.Agent = null;
        }
        catch (Exception e) when (e is TransferException or InvalidOperationException)
        {
            _log.LogWarning("unloading node {Node}'s transfer agent failed: {Error}", peer.Info.Node, e.Message);
        }
        finally
        {
            peer.AgentLock.Release();
        }

        peer.Client.Dispose();
    }

    /// <summary>
    /// One (node, tenant) event stream into the index, for as long as the node is a member: resubscribes after a gap, a
    /// malformed event or a broken stream (with backoff), from where it left off, so the node sends the range or a snapshot.
    /// </summary>
    private async Task FeedAsync(Peer peer, string tenantName, uint tenant, CancellationToken cancellationToken)
    {
        EventSequencer sequencer = _sequencers.GetOrAdd((peer.Info.Node, tenant), k => new EventSequencer(k.Node, k.Tenant, _index, Counters));
        TimeSpan backoff = MinBackoff;
        bool failedBefore = false;
        while (!cancellationToken.IsCancellationRequested)
        {
            bool resubscribeNow = false;
            try
            {
                sequencer.StreamStarted(); // a snapshot left half-read by a broken stream is dropped
                await using GrpcCall<SubscribeEventsRequest, Rpc.V1.KvEvent> call = peer.Client.SubscribeEvents(sequencer.LastSequence + 1,
                    new CallOptions(CancellationToken: cancellationToken), sequencer.Incarnation, tenantName);
                while (await call.ReadAsync().ConfigureAwait(false) is { } e)
                {
                    FeedVerdict verdict = await sequencer.AcceptAsync(e, cancellationToken).ConfigureAwait(false);
                    if (verdict is FeedVerdict.Gap or FeedVerdict.Malformed)
                    {
                        if (verdict == FeedVerdict.Malformed)
                            _log.LogWarning("node {Node}, tenant {Tenant}: rejected an event ({Why}); resubscribing", peer.Info.Node, tenantName, sequencer.LastError);
                        resubscribeNow = verdict == FeedVerdict.Gap;
                        Interlocked.Increment(ref Counters.Resubscribes);
                        break;
                    }

                    if (failedBefore)
                    {
                        _log.LogInformation("node {Node}, tenant {Tenant}: event feed back in line at sequence {Sequence}", peer.Info.Node, tenantName, sequencer.LastSequence);
                        failedBefore = false;
                    }

                    backoff = MinBackoff;
                }
            }
            catch (OperationCanceledException) when (cancellationToken.IsCancellationRequested)
            {
                return;
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // A broken stream, a refused call, or an event the index could not take: log once, back off, resubscribe.
                if (!failedBefore)
                    _log.LogWarning("node {Node}, tenant {Tenant}: event feed broke ({Error}); retrying", peer.Info.Node, tenantName, e.Message);
                failedBefore = true;
            }

            if (resubscribeNow)
                continue;
            try
            {
                await Task.Delay(backoff, cancellationToken).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }

            backoff = TimeSpan.FromTicks(Math.Min(backoff.Ticks * 2, MaxBackoff.Ticks));
        }
    }

    /// <summary>
    /// Compares the members known here with a listing of the store: a watch that restarted (the store's connection broke,
    /// or applying a change failed) cannot report members that left meanwhile. Listed but unknown: joined. Known but
    /// missing from two listings in a row (a lease apart): left. One missing listing is not enough: the watch may
    /// report a join the listing predates.
    /// </summary>
    private async Task ReconcileAsync()
    {
        // The listing is taken and its differences applied under the membership lock: a change the watch applies while
        // a listing taken before it is being compared (a member that left, one that came back) must not be undone by
        // the older listing, which would make a dead member routable again (or drop a live one) until the next listings.
        await _membership.WaitAsync(_stop.Token).ConfigureAwait(false);
        try
        {
            IReadOnlyList<NodeInfo> listed;
            try
            {
                listed = await _store.ListAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                _log.LogDebug("listing the cluster's members failed ({Error}); the next listing retries", e.Message);
                return;
            }

            var names = listed.Select(n => n.Node).ToHashSet(StringComparer.Ordinal);
            var changes = new List<MembershipChange>();
            foreach (NodeInfo n in listed)
            {
                if (!_peers.ContainsKey(n.Node))
                    changes.Add(new MembershipChange(MembershipChangeKind.Joined, n));
            }

            foreach (Peer p in _peers.Values)
            {
                if (names.Contains(p.Info.Node))
                    _missing.Remove(p.Info.Node);
                else if (!_missing.Add(p.Info.Node))
                    changes.Add(new MembershipChange(MembershipChangeKind.Left, p.Info));
            }

            foreach (MembershipChange c in changes)
            {
                _log.LogWarning("node {Node} {Kind} without the watch reporting it; reconciled from a listing of the store", c.Node.Node,
                    c.Kind == MembershipChangeKind.Left ? "left" : "joined");
                await ApplyLockedAsync(c).ConfigureAwait(false);
            }
        }
        finally
        {
            _membership.Release();
        }
    }

    private async Task PublishLoadAsync()
    {
        using var timer = new PeriodicTimer(_options.LoadInterval);
        long ticks = 0;
        long reconcileEvery = Math.Max(1, (long)(_options.LeaseTtl / _options.LoadInterval));
        try
        {
            while (await timer.WaitForNextTickAsync(_stop.Token).ConfigureAwait(false))
            {
                if (++ticks % reconcileEvery == 0)
                    await ReconcileAsync().ConfigureAwait(false);
                double load = _load();
                if (load == _publishedLoad || _registration is null)
                    continue;
                try
                {
                    await _registration.UpdateAsync(SelfInfo(load), _stop.Token).ConfigureAwait(false);
                    _publishedLoad = load;
                }
                catch (Exception e) when (e is not OperationCanceledException)
                {
                    _log.LogWarning("publishing node {Node}'s load failed: {Error}", _options.Node, e.Message);
                }
            }
        }
        catch (OperationCanceledException)
        {
            // stopping
        }
    }

    /// <summary>Every live member as a routing candidate, with what the index says it holds of the chain and its load.</summary>
    public List<RouteCandidateInfo> Candidates(uint tenant, BlockHash[] chain)
    {
        var matches = new List<LocationMatch>();
        _index.Match(tenant, chain, matches);
        var byLocation = new Dictionary<(string, string), LocationMatch>();
        foreach (LocationMatch m in matches)
            byLocation[(m.Node, m.Worker)] = m;
        var candidates = new List<RouteCandidateInfo>(_peers.Count);
        foreach (Peer p in _peers.Values)
        {
            NodeInfo info = p.Info;
            byLocation.TryGetValue((info.Node, info.Worker), out LocationMatch m);
            candidates.Add(new RouteCandidateInfo(info.Node, info.Worker, m.Gpu, m.Host, m.Ssd, info.Load + RoutedLately(info.Node)));
        }

        return candidates;
    }

    /// <summary>Counts a request this node just routed to the member, until the member's published load can show it.</summary>
    public void NoteRouted(string node) =>
        _routed.AddOrUpdate(node, _ => (1, Environment.TickCount64), (_, old) => (Decayed(old) + 1, Environment.TickCount64));

    private double RoutedLately(string node) => _routed.TryGetValue(node, out var routed) ? Decayed(routed) : 0;

    private double Decayed((double Value, long Ticks) routed) =>
        routed.Value * Math.Exp(-(Environment.TickCount64 - routed.Ticks) / _options.LoadInterval.TotalMilliseconds);

    /// <summary>
    /// Makes the longest prefix of the chain held anywhere local: the blocks this node lacks are exported by the member
    /// holding the most of them, READ through the transfer layer into staging slots here, checked, and stored as a Put.
    /// </summary>
    public async Task<FetchResponse> FetchAsync(uint tenant, string tenantName, BlockHash[] chain, TimeSpan? timeLeft, CancellationToken cancellationToken)
    {
        long started = System.Diagnostics.Stopwatch.GetTimestamp(); // the budget runs on the monotonic clock
        var tiers = new TierKind[chain.Length];
        int local = _fabric.Lookup(tenant, chain, tiers);
        var response = new FetchResponse { LocalBlocks = (uint)local };
        if (local == chain.Length)
            return response;
        var matches = new List<LocationMatch>();
        _index.Match(tenant, chain, matches);
        LocationMatch best = default;
        foreach (LocationMatch m in matches)
        {
            if (m.Node == _options.Node || m.Matched <= local || !_peers.ContainsKey(m.Node))
                continue;
            if (best.Node is null || m.Matched > best.Matched || (m.Matched == best.Matched && string.CompareOrdinal(m.Node, best.Node) < 0))
                best = m;
        }

        if (best.Node is null || !_peers.TryGetValue(best.Node, out Peer? peer))
            return response;
        RemoteAgent remote = await AgentOfAsync(peer, cancellationToken).ConfigureAwait(false);
        int blockBytes = _fabric.BlockBytes;
        int done = local;
        while (done < best.Matched)
        {
            TimeSpan left = (timeLeft ?? TimeSpan.FromSeconds(60)) - System.Diagnostics.Stopwatch.GetElapsedTime(started);
            if (left <= TimeSpan.Zero)
                throw new RpcException(StatusCode.DeadlineExceeded, $"fetch from node {peer.Info.Node} ran out of time after {done - local} blocks");
            int want = Math.Min(best.Matched - done, Math.Min(_options.FetchBatchBlocks, Math.Max(1, _staging.Available)));
            ExportResponse export;
            try
            {
                export = await peer.Client.ExportAsync(tenantName, Hashes.Pack(chain.AsSpan(done, want)).Memory, ExportLease,
                    new CallOptions(Deadline: left, CancellationToken: cancellationToken)).ConfigureAwait(false);
            }
            catch (ObjectDisposedException)
            {
                throw new RpcException(StatusCode.Unavailable, $"node {peer.Info.Node} left the cluster during the fetch; retry it");
            }
            int n = export.Blocks.Count;
            if (n == 0)
                break; // evicted there since the index heard of it
            try
            {
                await ReadAndStoreAsync(tenant, chain, done, export, remote, peer.Info.Node, left, response, cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                await ReleaseExportAsync(peer, tenantName, export.ExportId).ConfigureAwait(false);
            }

            done += n;
            response.FetchedBlocks += (uint)n;
            response.FetchedBytes += (ulong)n * (ulong)blockBytes;
            response.SourceNode = peer.Info.Node;
        }

        return response;
    }

    private async Task ReadAndStoreAsync(uint tenant, BlockHash[] chain, int start, ExportResponse export, RemoteAgent remote, string source,
        TimeSpan left, FetchResponse response, CancellationToken cancellationToken)
    {
        int n = export.Blocks.Count, blockBytes = _fabric.BlockBytes;
        ulong reservation;
        try
        {
            (reservation, _, _) = _staging.Reserve(tenant, n, ExportLease);
        }
        catch (StoreFullException e)
        {
            throw new RpcException(StatusCode.ResourceExhausted, $"no staging slots to fetch into: {e.Message}");
        }

        try
        {
            using StagingArea.SlotScope slots = _staging.Use(tenant, reservation);
            var localDescriptors = new MemoryDescriptor[n];
            var remoteDescriptors = new MemoryDescriptor[n];
            for (int i = 0; i < n; i++)
            {
                ExportedBlock b = export.Blocks[i];
                if (b.Length != (ulong)blockBytes)
                    throw new RpcException(StatusCode.FailedPrecondition, $"node {source} exported a block of {b.Length} bytes; this node's blocks are {blockBytes}: the nodes serve different layouts");
                localDescriptors[i] = MemoryDescriptor.Of(slots.Address((uint)i), blockBytes);
                remoteDescriptors[i] = new MemoryDescriptor(b.Address, b.Length);
            }

            // The exporter frees its slots when the export's lease ends: the READ must be over well before (a slot
            // reused by another tenant afterwards would otherwise be read as this block).
            TimeSpan leaseLeft = DateTimeOffset.FromUnixTimeMilliseconds((long)export.ExpiresUnixMs) - DateTimeOffset.UtcNow - ExportMargin;
            if (leaseLeft <= TimeSpan.Zero)
                throw new RpcException(StatusCode.Unavailable, $"node {source}'s export of {n} blocks expired before it could be read; retry the fetch");
            TransferRequest read = _agent.Prepare(TransferOp.Read, localDescriptors, remote, remoteDescriptors,
                new TransferOptions { Checksum = ChecksumKind.Crc32C, Deadline = left < leaseLeft ? left : leaseLeft });
            TransferResult result = await _agent.PostAsync(read, cancellationToken).ConfigureAwait(false);
            if (!result.IsSuccess)
                throw new RpcException(StatusCode.Unavailable, $"reading {n} blocks from node {source} through the transfer layer failed: {result}");
            response.Backend = read.Backend == BackendKind.SharedMemory ? "shm" : "tcp";
            using IPutBatch put = _fabric.BeginPut(tenant);
            for (int i = 0; i < n; i++)
            {
                int depth = start + i;
                // Stored straight from the staging slot the READ filled (held until the commit ends): no copy between.
                try
                {
                    put.AddBorrowed(chain[depth], depth > 0 ? chain[depth - 1] : null, depth, slots.Slot((uint)i)[..blockBytes]);
                }
                catch (StoreFullException e)
                {
                    throw new RpcException(StatusCode.ResourceExhausted, $"this node has no room to stage the fetched blocks: {e.Message}");
                }
            }

            PutOutcome outcome;
            try
            {
                outcome = await put.CommitAsync(cancellationToken).ConfigureAwait(false);
            }
            catch (StoreFullException e)
            {
                throw new RpcException(StatusCode.ResourceExhausted, $"this node has no room for the {n} fetched blocks: {e.Message}");
            }

            if (outcome.NotAdmitted > 0)
                throw new RpcException(StatusCode.ResourceExhausted, $"this node's tiers declined {outcome.NotAdmitted} fetched blocks (admission policy); nothing more is fetched");
        }
        finally
        {
            _staging.Release(tenant, reservation);
        }
    }

    private async Task ReleaseExportAsync(Peer peer, string tenantName, ulong exportId)
    {
        try
        {
            await peer.Client.ReleaseExportAsync(tenantName, exportId, new CallOptions(Deadline: TimeSpan.FromSeconds(5))).ConfigureAwait(false);
        }
        catch (ObjectDisposedException) when (TryAddress(peer.Info.GrpcEndpoint, out Uri? address))
        {
            // The node left the cluster during the fetch and its channel was closed, but it may well be up, its staging
            // slots held by this export for the rest of the lease: release through a channel of its own. (Escaping from
            // the fetch's finally, this exception also replaced its outcome, though the blocks were stored.)
            try
            {
                using var client = new FabricClient(new RpcChannelOptions { Address = address, Tenant = _options.ClusterTenant, Token = _options.ClusterToken });
                await client.ReleaseExportAsync(tenantName, exportId, new CallOptions(Deadline: TimeSpan.FromSeconds(5))).ConfigureAwait(false);
            }
            catch (Exception e) when (e is RpcException or IOException or HttpRequestException or OperationCanceledException)
            {
                _log.LogDebug("releasing export {Export} on node {Node}, which left, failed: {Error}", exportId, peer.Info.Node, e.Message);
            }
        }
        catch (Exception e) when (e is RpcException or IOException or HttpRequestException or OperationCanceledException)
        {
            // The export's lease frees it on the peer anyway.
            _log.LogDebug("releasing export {Export} on node {Node} failed: {Error}", exportId, peer.Info.Node, e.Message);
        }
    }

    private async Task<RemoteAgent> AgentOfAsync(Peer peer, CancellationToken cancellationToken)
    {
        await peer.AgentLock.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (peer.Stopped)
                throw new RpcException(StatusCode.Unavailable, $"node {peer.Info.Node} left the cluster during the fetch; retry it");
            NodeInfo info = peer.Info;
            if (peer.Agent is { } known && peer.AgentIncarnation == info.Incarnation)
                return known;
            if (peer.Agent is { } stale)
                await _agent.UnloadRemoteAsync(stale).ConfigureAwait(false);
            peer.Agent = await _agent.LoadRemoteAsync(info.AgentMetadata).ConfigureAwait(false);
            peer.AgentIncarnation = info.Incarnation;
            return peer.Agent;
        }
        catch (Exception e) when (e is TransferException or FormatException or ArgumentException)
        {
            throw new RpcException(StatusCode.FailedPrecondition, $"node {peer.Info.Node}'s transfer agent metadata could not be loaded: {e.Message}");
        }
        finally
        {
            peer.AgentLock.Release();
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        if (_registration is not null)
        {
            try
            {
                await _registration.DisposeAsync().ConfigureAwait(false); // revokes the lease: the node leaves at once
            }
            catch (Exception e)
            {
                _log.LogWarning("leaving the cluster cleanly failed ({Error}); the lease ends by itself within {Ttl} s", e.Message, _options.LeaseTtl.TotalSeconds);
            }
        }

        bool ended = true;
        foreach (Task? t in new[] { _watch, _loadLoop })
        {
            if (t is not null)
            {
                await t.WaitAsync(TimeSpan.FromSeconds(10)).ContinueWith(_ => { }, TaskScheduler.Default).ConfigureAwait(false);
                ended &= t.IsCompleted;
            }
        }

        foreach (Peer p in _peers.Values)
            await StopPeerAsync(p).ConfigureAwait(false);
        _peers.Clear();
        (_index as IDisposable)?.Dispose();
        await _store.DisposeAsync().ConfigureAwait(false); // the node owns the store it was given
        if (ended)
        {
            _stop.Dispose();
            _membership.Dispose();
        }
    }
}
