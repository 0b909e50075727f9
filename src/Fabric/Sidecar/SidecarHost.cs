using System.Net;
using System.Security.Cryptography.X509Certificates;
using KvFabric.Cluster;
using KvFabric.Index;
using KvFabric.Rpc;
using KvFabric.Service;
using KvFabric.Transfer;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;

namespace KvFabric.Sidecar;

/// <summary>
/// The sidecar: the block store, the transfer agent, the gRPC services on Kestrel (HTTP/2: h2c, or TLS when a certificate
/// is configured) and a Prometheus /metrics endpoint on its own port. Start, then Stop (health goes NOT_SERVING first).
/// </summary>
public sealed class SidecarHost : IAsyncDisposable
{
    private readonly SidecarOptions _options;
    private readonly ILoggerFactory _logs;
    private readonly ILogger _log;
    private WebApplication? _grpc;
    private WebApplication? _metrics;
    private GrpcDispatcher? _dispatcher;
    private int _activeCalls;

    private readonly IClusterStore? _clusterStore;

    /// <param name="clusterStore">The cluster store to join (several in-process sidecars sharing one in-process store); null: built from the options.</param>
    public SidecarHost(SidecarOptions options, ILoggerFactory? logs = null, IClusterStore? clusterStore = null)
    {
        _options = options.Validate();
        _clusterStore = clusterStore;
        _logs = logs ?? LoggerFactory.Create(b =>
        {
            b.AddFilter("Microsoft", LogLevel.Warning);
            if (options.JsonLogs)
                b.AddJsonConsole(o => { o.TimestampFormat = "yyyy-MM-ddTHH:mm:ss.fffZ"; o.UseUtcTimestamp = true; }); // the Z says UTC: it must be
            else
                b.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = "HH:mm:ss.fff "; o.UseUtcTimestamp = true; });
        });
        _log = _logs.CreateLogger("kvfabric.sidecar");
        Metrics = new MetricsRegistry();
        RpcMetrics = new RpcMetrics(Metrics);
        Staging = new StagingArea((int)options.Layout.BlockBytes, options.StagingSlots, options.StagingSlotsPerTenant);
        try
        {
            Agent = new TransferAgent(new TransferAgentOptions { Name = options.Node, ListenAddress = options.Listen, ListenPort = options.TransferPort });
        }
        catch
        {
            // A transfer port in use: no one gets this host to dispose, so its staging segment (in /dev/shm) goes now.
            Staging.Dispose();
            throw;
        }

        Router = new GrpcRouter();
        Health = new HealthService([FabricService.Name, IndexService.Name, TransferService.Name]);
        Health.Register(Router);
        RegisterGauges();
    }

    /// <summary>The node's block storage (the tier manager); set by StartAsync.</summary>
    public IFabricStore Store => _store ?? throw new InvalidOperationException("the sidecar is not started: call StartAsync first");

    private IFabricStore? _store;
    private SidecarTiers? _tiers;
    public StagingArea Staging { get; }
    public TransferAgent Agent { get; }
    public GrpcRouter Router { get; }
    public HealthService Health { get; }
    public MetricsRegistry Metrics { get; }
    public RpcMetrics RpcMetrics { get; }
    public IPEndPoint? GrpcEndpoint { get; private set; }
    /// <summary>This node's part in the cluster; null when standalone (cluster = none).</summary>
    public ClusterNode? Cluster { get; private set; }
    public IPEndPoint? MetricsEndpoint { get; private set; }
    public bool Tls => _options.TlsCertificate is not null;

    public async Task StartAsync(CancellationToken cancellationToken = default)
    {
        _tiers = await SidecarTiers.OpenAsync(_options, _log, cancellationToken).ConfigureAwait(false);
        _store = _tiers.Store;
        // Staging memory is where exports are read from and fetches land: peers reach it through the agent.
        Agent.Register(Staging.Pool);
        var tenants = new TenantRegistry(_options.EffectiveTenants);
        Func<double> load = () => Volatile.Read(ref _activeCalls);
        if (_options.Clustered)
        {
            TenantConfig credentials = _options.ClusterCredentials;
            Cluster = new ClusterNode(_clusterStore ?? ClusterFactory.CreateStore(_options, _logs), ClusterFactory.CreateIndex(Metrics), new ClusterNodeOptions
            {
                Node = _options.Node, Worker = _options.Worker, ClusterTenant = credentials.Name, ClusterToken = credentials.Token,
                Tenants = tenants.All.Select(t => t.Name).ToList(), LeaseTtl = _options.ClusterLeaseTtl,
            }, Agent, Store, Staging, load, _logs.CreateLogger("kvfabric.cluster"));
        }

        new FabricService(Store, Staging, RpcMetrics, _options.MaxSendMessageBytes, Cluster).Register(Router);
        new IndexService(Store, _options.Worker, load, tenants, Cluster).Register(Router);
        new TransferService(Agent, Store, Staging, tenants).Register(Router);
        if (_options.Reflection)
        {
            new ReflectionService(Router, [KvFabric.Rpc.V1.FabricReflection.Descriptor, KvFabric.Rpc.V1.IndexReflection.Descriptor,
                KvFabric.Rpc.V1.TransferReflection.Descriptor, Grpc.Health.V1.HealthReflection.Descriptor]).Register(Router);
        }
        var dispatcher = new GrpcDispatcher(Router, tenants, Metrics, _logs.CreateLogger("kvfabric.rpc"), _options.MaxReceiveMessageBytes)
        {
            StreamStallTimeout = _options.StreamStallTimeout, ServerName = $"node {_options.Node}",
        };
        _dispatcher = dispatcher;
        X509Certificate2? cert = Tls ? X509Certificate2.CreateFromPemFile(_options.TlsCertificate!, _options.TlsKey) : null;
        _grpc = Build(_options.Port, HttpProtocols.Http2, cert, StopLimit);
        _grpc.Run(async http =>
        {
            // Long-lived watch streams (the cluster's event feeds, health watchers) are not work: they stay out of the load.
            string path = http.Request.Path.Value ?? string.Empty;
            bool counted = !path.EndsWith("/SubscribeEvents", StringComparison.Ordinal) && !path.EndsWith("/Watch", StringComparison.Ordinal);
            if (counted)
                Interlocked.Increment(ref _activeCalls);
            try
            {
                await dispatcher.HandleAsync(http).ConfigureAwait(false);
            }
            finally
            {
                if (counted)
                    Interlocked.Decrement(ref _activeCalls);
            }
        });
        await _grpc.StartAsync(cancellationToken).ConfigureAwait(false);
        GrpcEndpoint = BoundEndpoint(_grpc);
        if (Cluster is not null)
        {
            // After the server is up: the node's own events reach the index through its own SubscribeEvents stream.
            string advertise = _options.Advertise ?? $"{(Tls ? "https" : "http")}://{GrpcEndpoint}";
            await Cluster.StartAsync(advertise, cancellationToken).ConfigureAwait(false);
        }

        if (_options.MetricsPort >= 0)
        {
            // Prometheus scrapes over HTTP/1.1. A scrape has no drain period: its stop keeps Kestrel's 5 s, not StopLimit
            // (up to shutdown_drain_s = 3600 s plus grace, which a stuck scraper would otherwise hold the stop for).
            _metrics = Build(_options.MetricsPort, HttpProtocols.Http1, null, shutdownTimeout: null);
            _metrics.Run(async http =>
            {
                if (http.Request.Path == "/metrics")
                {
                    http.Response.ContentType = "text/plain; version=0.0.4; charset=utf-8";
                    await http.Response.WriteAsync(Metrics.Render(), http.RequestAborted).ConfigureAwait(false);
                }
                else
                {
                    http.Response.StatusCode = StatusCodes.Status404NotFound;
                    await http.Response.WriteAsync("kvfabric: GET /metrics (Prometheus text format)\n", http.RequestAborted).ConfigureAwait(false);
                }
            });
            await _metrics.StartAsync(cancellationToken).ConfigureAwait(false);
            MetricsEndpoint = BoundEndpoint(_metrics);
        }

        _log.LogInformation("kvfabric node {Node} serving gRPC on {Scheme}://{Grpc}, metrics on {Metrics}, transfer agent on {Transfer}; layout {Layout}; tiers: {Tiers}{Dev}",
            _options.Node, Tls ? "https" : "http (h2c)", GrpcEndpoint, MetricsEndpoint?.ToString() ?? "(off)", Agent.TcpEndpoint,
            _options.Layout.Describe(), _tiers.Describe(), _options.Dev ? "; DEV MODE: tenant 'dev', token 'dev', loopback only" : string.Empty);
    }

    private WebApplication Build(int port, HttpProtocols protocols, X509Certificate2? cert, TimeSpan? shutdownTimeout) =>
        KestrelHost.Build(_options.Listen, port, protocols, cert, _logs, _options.KeepAlive, shutdownTimeout);

    // Kestrel cuts off what still runs only after the dispatcher's drain period and its grace (a margin for the statuses
    // to go out): the calls end with a status first.
    private TimeSpan StopLimit => _options.ShutdownDrain + GrpcDispatcher.DrainEndGrace + TimeSpan.FromSeconds(2);

    private static IPEndPoint BoundEndpoint(WebApplication app) => KestrelHost.BoundEndpoint(app);

    private void RegisterGauges()
    {
        Metrics.AddGauge("kvfabric_tier_capacity_bytes", "Capacity of each tier in bytes.", ["tier"],
            () => (_store?.GetStats(0).Tiers ?? []).Select(t => (new[] { t.Tier.ToString() }, (double)t.CapacityBytes)));
        Metrics.AddGauge("kvfabric_tier_used_bytes", "Bytes held in each tier.", ["tier"],
            () => (_store?.GetStats(0).Tiers ?? []).Select(t => (new[] { t.Tier.ToString() }, (double)t.UsedBytes)));
        Metrics.AddGauge("kvfabric_tier_blocks", "Blocks held in each tier.", ["tier"],
            () => (_store?.GetStats(0).Tiers ?? []).Select(t => (new[] { t.Tier.ToString() }, (double)t.Blocks)));
        Metrics.AddCounter("kvfabric_tier_hits", "Blocks read from each tier (hit rate of a tier = its rate / the sum of the rates).", ["tier"],
            () => (_store?.GetStats(0).Tiers ?? []).Select(t => (new[] { t.Tier.ToString() }, (double)t.Hits)));
        Metrics.AddCounter("kvfabric_tier_evictions", "Blocks evicted from each tier.", ["tier"],
            () => (_store?.GetStats(0).Tiers ?? []).Select(t => (new[] { t.Tier.ToString() }, (double)t.Evictions)));
        // The SSD tier's health: what an operator alerts on (a stopped or full tier, compaction that drops what it cannot read).
        Metrics.AddGauge("kvfabric_ssd_writes_stopped", "1 when a device error stopped the SSD tier's writes (until a restart); reads go on.", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.WritesStopped ? 1 : 0)] : []);
        Metrics.AddCounter("kvfabric_ssd_no_space_writes", "SSD tier writes that found its file system full (writes then pause and resume by themselves).", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.NoSpaceWrites)] : []);
        Metrics.AddCounter("kvfabric_ssd_no_space_log_commits", "SSD tier tombstone-log commits that found its file system full (removals then go to tombstone sectors in the data segments until a retry fits).", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.NoSpaceLogCommits)] : []);
        Metrics.AddGauge("kvfabric_ssd_removals_not_durable", "SSD tier removals whose tombstone is neither committed to the log nor written as a tombstone sector yet (a crash now would bring those blocks back).", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.RemovalsNotDurable)] : []);
        Metrics.AddCounter("kvfabric_ssd_tombstone_sectors", "SSD tier tombstones written as 4 KiB sectors in the data segments because the tombstone log's file system was full.", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.TombstoneSectorsWritten)] : []);
        Metrics.AddCounter("kvfabric_ssd_writes_refused_compaction_behind", "SSD tier writes refused because compaction had fallen behind (the data segments would outgrow the disk reserved at start).", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.WritesRefusedCompactionBehind)] : []);
        Metrics.AddCounter("kvfabric_ssd_compacted_segments", "SSD tier data segments freed by compaction.", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.CompactedSegments)] : []);
        Metrics.AddCounter("kvfabric_ssd_compaction_dropped_unreadable", "Blocks SSD compaction dropped because they could not be read back.", [],
            () => _tiers?.Ssd is { } ssd ? [([], ssd.CompactionDroppedUnreadable)] : []);
        // Running totals: counters (a restart drops them to 0, which rate() reads as a reset, not as negative traffic).
        Metrics.AddCounter("kvfabric_lookup_blocks", "Blocks asked for by Lookup, by outcome (hit rate = hit / (hit + miss)).", ["outcome"], () =>
        {
            StoreStats? s = _store?.GetStats(0);
            return s is null ? [] : [(["hit"], s.LookupHitBlocks), (["miss"], s.LookupMissBlocks)];
        });
        Metrics.AddCounter("kvfabric_transfer_bytes", "Bytes moved by the transfer agent, by backend and direction.", ["backend", "direction"], () =>
        [
            (["tcp", "sent"], Agent.Stats.TcpBytesSent), (["tcp", "received"], Agent.Stats.TcpBytesReceived),
            (["shm", "written"], Agent.Stats.ShmBytesWritten), (["shm", "read"], Agent.Stats.ShmBytesRead),
        ]);
        Metrics.AddGauge("kvfabric_staging_slots_free", "Free shared-memory staging slots for Reserve.", [], () => [([], Staging.Available)]);
        Metrics.AddGauge("kvfabric_cluster_members", "Live members of the cluster this node knows (itself included); 0 when standalone.", [],
            () => [([], Cluster?.Members.Count ?? 0)]);
        Metrics.AddCounter("kvfabric_index_feed_events", "KV events of the cluster's nodes seen by this node's index feeds, by outcome.", ["outcome"], () =>
        {
            FeedCounters? f = Cluster?.Counters;
            return f is null ? [] :
            [
                (["applied"], Interlocked.Read(ref f.Applied)), (["stale"], Interlocked.Read(ref f.Stale)), (["gap"], Interlocked.Read(ref f.Gaps)),
                (["malformed"], Interlocked.Read(ref f.Malformed)), (["snapshot"], Interlocked.Read(ref f.Snapshots)),
            ];
        });
        Metrics.AddGauge("kvfabric_rpc_active_calls", "gRPC calls in progress (watch streams not counted): the node's load in Route.", [], () => [([], Volatile.Read(ref _activeCalls))]);
    }

    /// <summary>
    /// Graceful stop: health NOT_SERVING; new calls refused and watch streams ended at once (UNAVAILABLE); the listener
    /// closed and GOAWAY sent; calls doing work get shutdown_drain_s, then end as UNAVAILABLE. Bounded by StopLimit.
    /// </summary>
    public async Task StopAsync()
    {
        Health.SetAllNotServing();
        Task drained = _dispatcher?.ShutdownAsync(_options.ShutdownDrain) ?? Task.CompletedTask;
        if (Cluster is not null)
        {
            await Cluster.DisposeAsync().ConfigureAwait(false); // leaves the cluster at once (revokes the lease)
            Cluster = null;
        }

        if (_grpc is not null)
        {
            // Kestrel's stop closes the listener and sends GOAWAY (clients open no new streams here), then waits for the
            // calls the dispatcher drains; only past StopLimit does it abort their connections.
            using var limit = new CancellationTokenSource(StopLimit);
            Task stopped = _grpc.StopAsync(limit.Token);
            await drained.ConfigureAwait(false);
            await stopped.ConfigureAwait(false);
        }

        if (_metrics is not null)
            await _metrics.StopAsync().ConfigureAwait(false);
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync().ConfigureAwait(false);
        if (_grpc is not null)
            await _grpc.DisposeAsync().ConfigureAwait(false);
        if (_metrics is not null)
            await _metrics.DisposeAsync().ConfigureAwait(false);
        await Agent.DisposeAsync().ConfigureAwait(false);
        await Task.Run(Staging.Dispose).ConfigureAwait(false); // waits (bounded) for a fetch still storing from its slots
        if (Staging.LeftMapped)
            _log.LogWarning("a call still used staging slots {Seconds} s after the stop began; their shared memory stays mapped until the process exits", 30);
        _tiers?.Dispose();
    }
}
