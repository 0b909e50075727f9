using KvFabric.Index;
using KvFabric.Rpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging;

namespace KvFabric.Cluster;

/// <summary>Builds the cluster store and index a sidecar's options ask for.</summary>
public static class ClusterFactory
{
    public static IClusterStore CreateStore(SidecarOptions options, ILoggerFactory logs) => options.Cluster switch
    {
        "inproc" => new InProcessClusterStore(options.ClusterName, log: logs.CreateLogger("kvfabric.cluster.store")),
        "etcd" => new EtcdClusterStore(ParseEndpoint(options.EtcdEndpoint), options.ClusterName, logs.CreateLogger("kvfabric.cluster.etcd")),
        _ => throw new ArgumentException($"cluster must be 'inproc' or 'etcd' to build a cluster store; got '{options.Cluster}'"),
    };

    private static Uri ParseEndpoint(string text) =>
        Uri.TryCreate(text, UriKind.Absolute, out Uri? uri) && uri.Scheme is "http" or "https"
            ? uri
            : throw new ArgumentException($"etcd_endpoint must be an http(s) URL such as http://127.0.0.1:2379; got '{text}'");

    public static RadixClusterIndex CreateIndex(MetricsRegistry metrics)
    {
        var index = new RadixClusterIndex(new RadixIndex());
        metrics.AddGauge("kvfabric_index_blocks", "Blocks in this node's copy of the cluster index (all tenants).", [],
            () => [([], index.Index.Counters.Blocks)]);
        metrics.AddGauge("kvfabric_index_locations", "(block, worker) locations in this node's copy of the cluster index.", [],
            () => [([], index.Index.Counters.Locations)]);
        metrics.AddGauge("kvfabric_index_bytes", "Memory of this node's copy of the cluster index, bytes.", [],
            () => [([], index.Index.Counters.BytesAllocated)]);
        metrics.AddCounter("kvfabric_index_rejected_events", "Events the index writer rejected, by reason.", ["reason"],
            () => index.Index.Counters.Rejected.Select(kv => (new[] { kv.Key }, (double)kv.Value)));
        metrics.AddCounter("kvfabric_index_growths", "Index tables doubled by the writer outside the readers' lock (ahead), and attempts that failed (no memory).", ["outcome"],
            () => [(["ahead"], index.Index.GrowthsAhead), (["failed"], index.Index.GrowthFailures)]);
        return index;
    }
}
