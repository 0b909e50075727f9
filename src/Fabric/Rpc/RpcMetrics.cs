namespace KvFabric.Rpc;

/// <summary>The service's own counters (the dispatcher records calls and latency).</summary>
public sealed class RpcMetrics(MetricsRegistry registry)
{
    public MetricsRegistry Registry { get; } = registry;

    public MetricsRegistry.Counter BytesIn { get; } =
        registry.CreateCounter("kvfabric_rpc_block_bytes_received_total", "Block bytes received by gRPC calls (streamed or from staging slots).", "call");

    public MetricsRegistry.Counter BytesOut { get; } =
        registry.CreateCounter("kvfabric_rpc_block_bytes_sent_total", "Block bytes streamed by gRPC calls.", "call");
}
