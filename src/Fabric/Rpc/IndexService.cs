using KvFabric.Blocks;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Service;
using KvFabric.Tiers;

namespace KvFabric.Rpc;

/// <summary>A worker the router may send work to, with what it holds of a chain and its current load.</summary>
public readonly record struct RouteCandidateInfo(string Node, string Worker, int GpuBlocks, int HostBlocks, int SsdBlocks, double Load);

/// <summary>
/// The routing cost (docs/api.md): blocks left to prefill after the overlap, where a block already on the GPU saves a
/// whole block of prefill, one in host memory a little less (it must be loaded), one on SSD less again; plus the
/// worker's load (queued blocks of work). Cheapest wins; ties go to the lexicographically smallest (node, worker).
/// </summary>
public static class RouteCost
{
    public const double GpuWeight = 1.0, HostWeight = 0.9, SsdWeight = 0.6;

    public static double Of(in RouteCandidateInfo c, int chainLength) =>
        chainLength - (GpuWeight * c.GpuBlocks + HostWeight * c.HostBlocks + SsdWeight * c.SsdBlocks) + c.Load;

    /// <summary>Index into candidates of the chosen one: argmin cost at temperature 0, else softmax(-cost/T) drawn with seed.</summary>
    public static int Choose(IReadOnlyList<RouteCandidateInfo> candidates, int chainLength, double temperature, ulong seed)
    {
        if (candidates.Count == 0)
            throw new ArgumentException("no candidates", nameof(candidates));
        int best = 0;
        for (int i = 1; i < candidates.Count; i++)
        {
            double a = Of(candidates[i], chainLength), b = Of(candidates[best], chainLength);
            if (a < b || (a == b && Compare(candidates[i], candidates[best]) < 0))
                best = i;
        }

        if (temperature <= 0)
            return best;
        double min = Of(candidates[best], chainLength);
        var weights = candidates.Select(c => Math.Exp(-(Of(c, chainLength) - min) / temperature)).ToArray();
        double draw = new Random(unchecked((int)seed ^ (int)(seed >> 32))).NextDouble() * weights.Sum();
        for (int i = 0; i < weights.Length; i++)
        {
            draw -= weights[i];
            if (draw <= 0)
                return i;
        }

        return weights.Length - 1;
    }

    private static int Compare(in RouteCandidateInfo a, in RouteCandidateInfo b)
    {
        int c = string.CompareOrdinal(a.Node, b.Node);
        return c != 0 ? c : string.CompareOrdinal(a.Worker, b.Worker);
    }
}

/// <summary>
/// kvfabric.v1.Index on one node. Standalone, Match and Route answer from what this node's store holds; in a cluster,
/// from the cluster-wide radix index over every live member. SubscribeEvents streams this node's KV events per tenant.
/// </summary>
public sealed class IndexService(IFabricStore store, string worker, Func<double> load, TenantRegistry? tenants = null, Cluster.ClusterNode? cluster = null)
{
    public const string Name = "kvfabric.v1.Index";
    private const int EventBatch = 256;
    private const int MaxRun = 4096; // blocks per snapshot event: 64 KiB of hashes

    public void Register(GrpcRouter router)
    {
        router.Unary<MatchRequest, MatchResponse>($"/{Name}/Match", MatchRequest.Parser, (r, c) => Task.FromResult(Match(r, c)));
        router.Unary<RouteRequest, RouteResponse>($"/{Name}/Route", RouteRequest.Parser, (r, c) => Task.FromResult(Route(r, c)));
        router.ServerStreaming<SubscribeEventsRequest>($"/{Name}/SubscribeEvents", SubscribeEventsRequest.Parser, SubscribeAsync, watch: true);
    }

    private List<RouteCandidateInfo> Candidates(uint tenant, BlockHash[] chain)
    {
        if (cluster is not null)
            return cluster.Candidates(tenant, chain); // every live member, from the cluster index
        var tiers = new TierKind[chain.Length];
        int matched = store.Lookup(tenant, chain, tiers);
        int gpu = 0, host = 0, ssd = 0;
        for (int i = 0; i < matched; i++)
        {
            switch (tiers[i])
            {
                case TierKind.Gpu: gpu++; break;
                case TierKind.Host: host++; break;
                default: ssd++; break;
            }
        }

        return [new RouteCandidateInfo(store.Node, worker, gpu, host, ssd, load())];
    }

    private MatchResponse Match(MatchRequest request, ServerCall call)
    {
        BlockHash[] chain = Hashes.Parse(request.Hashes, "hashes", requireOne: false);
        var response = new MatchResponse();
        foreach (RouteCandidateInfo c in Candidates(call.RequiredTenant.Id, chain).OrderByDescending(c => c.GpuBlocks + c.HostBlocks + c.SsdBlocks))
        {
            uint matched = (uint)(c.GpuBlocks + c.HostBlocks + c.SsdBlocks);
            if (matched > 0)
            {
                response.Matches.Add(new WorkerMatch
                {
                    Node = c.Node, Worker = c.Worker, MatchedBlocks = matched,
                    GpuBlocks = (uint)c.GpuBlocks, HostBlocks = (uint)c.HostBlocks, SsdBlocks = (uint)c.SsdBlocks,
                });
            }
        }

        return response;
    }

    private RouteResponse Route(RouteRequest request, ServerCall call)
    {
        if (!double.IsFinite(request.Temperature) || request.Temperature < 0)
            throw new RpcException(StatusCode.InvalidArgument, $"temperature must be a finite number >= 0; got {request.Temperature}");
        BlockHash[] chain = Hashes.Parse(request.Hashes, "hashes", requireOne: false);
        List<RouteCandidateInfo> candidates = Candidates(call.RequiredTenant.Id, chain);
        if (candidates.Count == 0)
        {
            throw new RpcException(StatusCode.Unavailable,
                $"node {store.Node} knows no live member of the cluster to route to (it has not joined yet, or its lease in {cluster?.StoreDescription} lapsed); retry shortly or ask another node");
        }

        int chosen = RouteCost.Choose(candidates, chain.Length, request.Temperature, request.Seed);
        RouteCandidateInfo pick = candidates[chosen];
        cluster?.NoteRouted(pick.Node);
        var response = new RouteResponse
        {
            Node = pick.Node,
            Worker = pick.Worker,
            ExpectedHitBlocks = (uint)(pick.GpuBlocks + pick.HostBlocks + pick.SsdBlocks),
            Cost = RouteCost.Of(pick, chain.Length),
        };
        foreach (RouteCandidateInfo c in candidates.OrderBy(c => RouteCost.Of(c, chain.Length)).ThenBy(c => c.Node, StringComparer.Ordinal))
        {
            response.Candidates.Add(new V1.RouteCandidate
            {
                Node = c.Node, Worker = c.Worker, Cost = RouteCost.Of(c, chain.Length),
                MatchedBlocks = (uint)(c.GpuBlocks + c.HostBlocks + c.SsdBlocks), Load = c.Load,
            });
        }

        return response;
    }

    private async Task SubscribeAsync(SubscribeEventsRequest request, ServerCall call)
    {
        uint tenant = SubscribedTenant(request, call);
        ulong next = Math.Max(1, request.FromSequence);
        // A subscriber that knew another incarnation of this node (it restarted) must start over from a snapshot.
        bool snapshotFirst = request.Incarnation != 0 && request.Incarnation != store.Events.Incarnation;
        var batch = new List<Service.KvEvent>(EventBatch);
        while (true)
        {
            batch.Clear();
            if (!store.Events.TryRead(tenant, next, batch, EventBatch, out Task changed) || snapshotFirst)
            {
                snapshotFirst = false;
                // The subscriber fell behind what the node retains: send a snapshot, then resume after it.
                next = await WriteSnapshotAsync(tenant, call).ConfigureAwait(false) + 1;
                continue;
            }

            if (batch.Count == 0)
            {
                await call.FlushAsync().ConfigureAwait(false);
                await changed.WaitAsync(call.CancellationToken).ConfigureAwait(false);
                continue;
            }

            foreach (Service.KvEvent e in batch)
                call.Write(ToWire(e));
            await call.FlushAsync().ConfigureAwait(false);
            next = batch[^1].Sequence + 1;
        }
    }

    private uint SubscribedTenant(SubscribeEventsRequest request, ServerCall call)
    {
        if (request.Tenant.Length == 0 || request.Tenant == call.RequiredTenant.Name)
            return call.RequiredTenant.Id;
        if (!call.RequiredTenant.Admin)
            throw new RpcException(StatusCode.PermissionDenied, $"tenant '{call.RequiredTenant.Name}' may only subscribe to its own events; subscribing for tenant '{request.Tenant}' needs an admin tenant");
        if (tenants is not null && !tenants.All.Any(t => t.Name == request.Tenant))
            throw new RpcException(StatusCode.NotFound, $"tenant '{request.Tenant}' is not configured on node {store.Node}; configure the same tenants on every node of a cluster");
        return TenantRegistry.IdOf(request.Tenant);
    }

    /// <summary>
    /// Sends everything the tenant holds as Stored events with snapshot = true, one per run of a chain in one tier, then
    /// SnapshotEnd; returns the sequence number the snapshot stands for.
    /// </summary>
    private async Task<ulong> WriteSnapshotAsync(uint tenant, ServerCall call)
    {
        var (sequence, events) = store.Snapshot(tenant);
        var run = new List<BlockHash>();
        BlockHash? runParent = null;
        TierKind runTier = TierKind.Gpu;
        int sent = 0;

        async ValueTask FlushRunAsync()
        {
            if (run.Count == 0)
                return;
            call.Write(new V1.KvEvent
            {
                Sequence = sequence, Node = store.Node, Worker = worker, Snapshot = true, Incarnation = store.Events.Incarnation,
                Stored = new BlocksStored
                {
                    ParentHash = runParent is { } p ? Hashes.Pack(p) : Google.Protobuf.ByteString.Empty,
                    Hashes = Hashes.Pack(System.Runtime.InteropServices.CollectionsMarshal.AsSpan(run)),
                    Tier = Hashes.ToWire(runTier),
                },
            });
            run.Clear();
            if (++sent % EventBatch == 0)
                await call.FlushAsync().ConfigureAwait(false); // a lagging subscriber's backlog stays bounded
        }

        foreach (Service.KvEvent e in events)
        {
            // Events list parents before children, depth first: a block continues the run when it is the child of its last block.
            bool continues = run.Count > 0 && e.Tier == runTier && e.Parent is { } parent && parent == run[^1] && run.Count < MaxRun;
            if (!continues)
            {
                await FlushRunAsync().ConfigureAwait(false);
                runParent = e.Parent;
                runTier = e.Tier;
            }

            run.AddRange(e.Hashes);
        }

        await FlushRunAsync().ConfigureAwait(false);
        call.Write(new V1.KvEvent
        {
            Sequence = sequence, Node = store.Node, Worker = worker, Snapshot = true, Incarnation = store.Events.Incarnation,
            SnapshotEnd = new SnapshotEnd { Blocks = (ulong)events.Count },
        });
        await call.FlushAsync().ConfigureAwait(false);
        return sequence;
    }

    private V1.KvEvent ToWire(Service.KvEvent e)
    {
        var wire = new V1.KvEvent { Sequence = e.Sequence, Node = store.Node, Worker = worker, Snapshot = e.Snapshot, Incarnation = store.Events.Incarnation };
        switch (e.Kind)
        {
            case Service.KvEventKind.Stored:
                wire.Stored = new BlocksStored
                {
                    ParentHash = e.Parent is { } p ? Hashes.Pack(p) : Google.Protobuf.ByteString.Empty,
                    Hashes = Hashes.Pack(e.Hashes),
                    Tier = Hashes.ToWire(e.Tier),
                };
                break;
            case Service.KvEventKind.Removed:
                wire.Removed = new BlocksRemoved { Hashes = Hashes.Pack(e.Hashes), Tier = Hashes.ToWire(e.Tier) };
                break;
            default:
                wire.Cleared = new AllCleared { Tier = Hashes.ToWire(e.Tier) };
                break;
        }

        return wire;
    }
}
