using System.Collections.Concurrent;
using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Transfer;

namespace KvFabric.Rpc;

/// <summary>
/// kvfabric.v1.Transfer: the sidecar's transfer agent seen through gRPC. Its metadata carries region access keys for the
/// whole node, so only tenants configured as admin (the cluster's own sidecars and operators) may call it.
/// </summary>
public sealed class TransferService(TransferAgent agent)
{
    public const string Name = "kvfabric.v1.Transfer";
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
        TimeSpan? deadline = call.Deadline is { } d ? d - DateTime.UtcNow : null;
        TransferResult result = await agent.SendNotificationAsync(remote, request.Message.Memory, deadline, call.CancellationToken).ConfigureAwait(false);
        if (!result.IsSuccess)
            throw new RpcException(StatusCode.Unavailable, $"notification to {remote.Name} failed: {result}");
        return new NotifyResponse();
    }
}
