using System.Collections.Concurrent;
using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Service;
using KvFabric.Transfer;

namespace KvFabric.Rpc;

/// <summary>
/// kvfabric.v1.Transfer: the sidecar's transfer agent seen through gRPC. Its metadata carries region access keys for the
/// whole node, so only tenants configured as admin (the cluster's own sidecars and operators) may call it.
/// </summary>
public sealed class TransferService(TransferAgent agent, IFabricStore? store = null, StagingArea? staging = null, TenantRegistry? tenants = null)
{
    public const string Name = "kvfabric.v1.Transfer";
    public const int MaxExportBlocks = 1024;
    private static readonly TimeSpan DefaultExportLease = TimeSpan.FromSeconds(30), MaxExportLease = TimeSpan.FromMinutes(10);
    public const int MaxNotificationBytes = 64 * 1024;
    private readonly ConcurrentDictionary<Guid, RemoteAgent> _peers = new();

    public void Register(GrpcRouter router)
    {
        router.Unary<GetMetadataRequest, GetMetadataResponse>($"/{Name}/GetMetadata", GetMetadataRequest.Parser, (_, c) =>
        {
            RequireAdmin(c);
            return Task.FromResult(new GetMetadataResponse { AgentName = agent.Name, Metadata = ByteString.CopyFrom(agent.ExportMetadata()) });
        });
        router.Unary<LoadMetadataRequest, LoadMetadataResponse>($"/{Name}/LoadMetadata", LoadMetadataRequest.Parser, LoadAsync);
        router.Unary<NotifyRequest, NotifyResponse>($"/{Name}/Notify", NotifyRequest.Parser, NotifyAsync);
        router.Unary<ExportRequest, ExportResponse>($"/{Name}/Export", ExportRequest.Parser, ExportAsync, undelivered: (request, response, _) =>
        {
            if (response.ExportId != 0)
                Staging.Release(TenantIdOf(request.Tenant), response.ExportId);
        });
        router.Unary<ReleaseExportRequest, ReleaseExportResponse>($"/{Name}/ReleaseExport", ReleaseExportRequest.Parser, (r, c) =>
        {
            RequireAdmin(c);
            return Task.FromResult(new ReleaseExportResponse { Released = Staging.Release(TenantIdOf(r.Tenant), r.ExportId) });
        });
    }

    private StagingArea Staging => staging ?? throw new RpcException(StatusCode.Unimplemented, "this node serves no block store, so it exports nothing");

    private uint TenantIdOf(string name)
    {
        if (tenants is null || !tenants.All.Any(t => t.Name == name))
            throw new RpcException(StatusCode.NotFound, $"tenant '{name}' is not configured on this node; configure the same tenants on every node of a cluster");
        return TenantRegistry.IdOf(name);
    }

    // Copies the longest present prefix of the chain (as much as free staging slots allow) into registered staging memory,
    // held under the tenant until ReleaseExport or the lease's end, and describes where each block now is.
    private async Task<ExportResponse> ExportAsync(ExportRequest request, ServerCall call)
    {
        RequireAdmin(call);
        if (store is null)
            throw new RpcException(StatusCode.Unimplemented, "this node serves no block store, so it exports nothing");
        uint tenant = TenantIdOf(request.Tenant);
        Blocks.BlockHash[] chain = Hashes.Parse(request.Hashes, "hashes", requireOne: true);
        if (chain.Length > MaxExportBlocks)
            throw new RpcException(StatusCode.InvalidArgument, $"{chain.Length} blocks asked for; export at most {MaxExportBlocks} per call");
        TimeSpan lease = request.LeaseMs == 0 ? DefaultExportLease : TimeSpan.FromMilliseconds(request.LeaseMs);
        if (lease > MaxExportLease)
            throw new RpcException(StatusCode.InvalidArgument, $"lease_ms {request.LeaseMs} is over the {MaxExportLease.TotalMilliseconds} ms limit");
        var tiers = new Tiers.TierKind[chain.Length];
        int present = store.Lookup(tenant, chain, tiers);
        var response = new ExportResponse { AgentId = agent.AgentId.ToString() };
        if (present == 0)
            return response;
        int n = Math.Min(present, Staging.Available);
        if (n == 0)
            throw new RpcException(StatusCode.ResourceExhausted, $"node {store.Node} has no free staging slot to export from (all {Staging.Capacity} in use); retry shortly");
        ulong id;
        DateTimeOffset expires;
        try
        {
            (id, _, expires) = Staging.Reserve(tenant, n, lease);
        }
        catch (StoreFullException e)
        {
            throw new RpcException(StatusCode.ResourceExhausted, e.Message);
        }

        bool keep = false;
        try
        {
            using (StagingArea.SlotScope slots = Staging.Use(tenant, id))
            {
                for (int i = 0; i < n; i++)
                {
                    using ReadLease? block = await store.OpenReadAsync(tenant, chain[i], call.CancellationToken).ConfigureAwait(false);
                    if (block is null)
                        break; // evicted since Lookup: the prefix ends here
                    ReadOnlyMemory<byte> bytes;
                    try
                    {
                        bytes = await block.LoadAsync(call.CancellationToken).ConfigureAwait(false);
                    }
                    catch (BlockNotFoundException)
                    {
                        break; // failed its checksum in its tier and was dropped: the prefix ends here
                    }
                    catch (StoreFullException e)
                    {
                        throw new RpcException(StatusCode.ResourceExhausted, e.Message);
                    }
                    bytes.Span.CopyTo(slots.Slot((uint)i).Span);
                    response.Blocks.Add(new ExportedBlock { Address = (ulong)slots.Address((uint)i), Length = (ulong)bytes.Length, Tier = Hashes.ToWire(block.Tier) });
                }
            }

            keep = response.Blocks.Count > 0;
            response.ExportId = keep ? id : 0;
            response.ExpiresUnixMs = (ulong)expires.ToUnixTimeMilliseconds();
            return response;
        }
        finally
        {
            if (!keep)
                Staging.Release(tenant, id);
        }
    }

    private static void RequireAdmin(ServerCall call)
    {
        if (!call.RequiredTenant.Admin)
            throw new RpcException(StatusCode.PermissionDenied, $"tenant '{call.RequiredTenant.Name}' may not use the Transfer service: it exposes node-wide memory keys; use an admin tenant");
    }

    private async Task<LoadMetadataResponse> LoadAsync(LoadMetadataRequest request, ServerCall call)
    {
        RequireAdmin(call);
        RemoteAgent remote;
        try
        {
            remote = await agent.LoadRemoteAsync(request.Metadata.Memory).ConfigureAwait(false);
        }
        catch (Exception e) when (e is TransferException or FormatException or ArgumentException)
        {
            throw new RpcException(StatusCode.InvalidArgument, $"metadata could not be loaded: {e.Message}");
        }

        _peers[remote.AgentId] = remote;
        return new LoadMetadataResponse { AgentName = remote.Name, AgentId = remote.AgentId.ToString() };
    }

    private async Task<NotifyResponse> NotifyAsync(NotifyRequest request, ServerCall call)
    {
        RequireAdmin(call);
        if (!Guid.TryParse(request.AgentId, out Guid id) || !_peers.TryGetValue(id, out RemoteAgent? remote))
            throw new RpcException(StatusCode.NotFound, $"agent '{request.AgentId}' is not loaded here; call LoadMetadata with its metadata first");
        if (request.Message.Length > MaxNotificationBytes)
            throw new RpcException(StatusCode.InvalidArgument, $"notification of {request.Message.Length} bytes is over the {MaxNotificationBytes}-byte limit");
        TimeSpan? deadline = call.TimeLeft;
        if (deadline <= TimeSpan.Zero)
            throw new RpcException(StatusCode.DeadlineExceeded, $"the deadline passed before the notification to {remote.Name} was sent; nothing was sent");
        TransferResult result = await agent.SendNotificationAsync(remote, request.Message.Memory, deadline, call.CancellationToken).ConfigureAwait(false);
        if (!result.IsSuccess)
            throw new RpcException(StatusCode.Unavailable, $"notification to {remote.Name} failed: {result}");
        return new NotifyResponse();
    }
}
