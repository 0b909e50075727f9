using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;

namespace KvFabric.Workers.Serving;

/// <summary>The typed client of a worker's kvfabric.v1.Worker service.</summary>
public sealed class WorkerClient : IDisposable
{
    private const string Service = "/kvfabric.v1.Worker/";

    public WorkerClient(string name, string address, string tenant, string token)
    {
        Name = name;
        Address = address;
        Channel = new RpcChannel(new RpcChannelOptions { Address = new Uri(address), Tenant = tenant, Token = token, DefaultDeadline = TimeSpan.FromMinutes(5), MaxRetries = 0 });
    }

    public string Name { get; }
    public string Address { get; }
    public RpcChannel Channel { get; }

    public Task<ReserveHandoffResponse> ReserveAsync(ulong requestId, int promptTokens, CallOptions options = default) =>
        Channel.UnaryAsync(Service + "Reserve", new ReserveHandoffRequest { RequestId = requestId, PromptTokens = (uint)promptTokens },
            ReserveHandoffResponse.Parser, options);

    public Task<PrefillResponse> PrefillAsync(PrefillRequest request, CallOptions options = default) =>
        Channel.UnaryAsync(Service + "Prefill", request, PrefillResponse.Parser, options);

    /// <summary>The decode stream of a reserved request: read GeneratedTokens until null.</summary>
    public GrpcCall<DecodeRequest, GeneratedTokens> Decode(DecodeRequest request, CallOptions options = default) =>
        Channel.ServerStreaming(Service + "Decode", request, GeneratedTokens.Parser, options);

    public GrpcCall<GenerateRequest, GeneratedTokens> Generate(GenerateRequest request, CallOptions options = default) =>
        Channel.ServerStreaming(Service + "Generate", request, GeneratedTokens.Parser, options);

    public Task<WorkerStatus> StatusAsync(CallOptions options = default) =>
        Channel.UnaryAsync(Service + "Status", new WorkerStatusRequest(), WorkerStatus.Parser, options, idempotent: true);

    public void Dispose() => Channel.Dispose();
}
