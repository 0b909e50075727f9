using System.Globalization;
using System.Net;
using KvFabric.Blocks;
using KvFabric.Rpc;
using Microsoft.Extensions.Configuration;

namespace KvFabric.Sidecar;

/// <summary>
/// Everything `kvfabric serve` is configured with. Sources, later ones winning: a JSON file (--config), environment
/// variables prefixed KVFABRIC_ (KVFABRIC_PORT, KVFABRIC_LAYOUT__LAYERS, ...), then command-line flags. Keys are listed in
/// docs/operations.md.
/// </summary>
public sealed record SidecarOptions
{
    public string Node { get; init; } = Environment.MachineName;
    public string Worker { get; init; } = "worker-0";
    public IPAddress Listen { get; init; } = IPAddress.Loopback;
    /// <summary>gRPC port; 0 picks a free one (printed on the READY line).</summary>
    public int Port { get; init; } = 50051;
    /// <summary>Prometheus /metrics port; 0 picks a free one; -1 disables the endpoint.</summary>
    public int MetricsPort { get; init; } = 9464;
    public int TransferPort { get; init; }
    public bool Dev { get; init; }
    public string? TlsCertificate { get; init; }
    public string? TlsKey { get; init; }
    public IReadOnlyList<TenantConfig> Tenants { get; init; } = [];
    public KvLayout Layout { get; init; } = DefaultLayout;
    public long HostCapacityBytes { get; init; } = 1L << 30;
    /// <summary>GPU tier bytes (CUDA device memory, or emulated in host memory when there is no GPU); 0: no GPU tier.</summary>
    public long GpuCapacityBytes { get; init; }
    public int GpuDevice { get; init; }
    /// <summary>Directory of the SSD tier's log; null: no SSD tier.</summary>
    public string? SsdDirectory { get; init; }
    public long SsdCapacityBytes { get; init; } = 16L << 30;
    /// <summary>Eviction policy of the GPU and host tiers (PolicyFactory names: lru, cost, ...).</summary>
    public string Policy { get; init; } = "cost";
    /// <summary>Eviction policy of the SSD tier; "+seen-twice" makes it admit a block only the second time it is offered.</summary>
    public string SsdPolicy { get; init; } = "lru";
    /// <summary>"seen-twice": the SSD tier takes a block only the second time it is offered (asked on every entry, so it
    /// saves writes even while the SSD has room); "always" (default): every block the tiers above let go.</summary>
    public string SsdAdmission { get; init; } = "always";
    /// <summary>Read and verify every SSD block while opening (a scrub), not only the writes since the last settled mark.</summary>
    public bool SsdVerifyOnOpen { get; init; }
    public bool WriteThrough { get; init; }
    /// <summary>Recompute cost for the load-versus-recompute gate (milliseconds per block, plus per block per depth); null: gate off.</summary>
    public double? RecomputeMsPerBlock { get; init; }
    public double? RecomputeMsPerBlockPerDepth { get; init; }
    /// <summary>Blocks all Puts in progress may stage at once (each a block-sized buffer).</summary>
    public int PutStagingBlocks { get; init; } = 64;
    /// <summary>Block buffers that reads of blocks outside host memory (Get and Export of SSD or GPU blocks) may hold at once.</summary>
    public int ReadBuffers { get; init; } = 16;
    public int StagingSlots { get; init; } = 64;
    /// <summary>Staging slots one tenant may hold at once (its reservations and exports); null: all of them.</summary>
    public int? StagingSlotsPerTenant { get; init; }
    /// <summary>KV events kept per tenant for subscribers that fall behind; one further back gets a snapshot.</summary>
    public int EventLogCapacity { get; init; } = 65536;
    /// <summary>
    /// How long a client connection may stay silent before the server PINGs it; one that answers no PING within this
    /// (at most 20 s) is dropped and its calls end (a frozen host or a partition, whose open Puts would hold their
    /// staging buffers, and Watch/SubscribeEvents streams their handlers, forever).
    /// </summary>
    public TimeSpan KeepAlive { get; init; } = TimeSpan.FromSeconds(60);

    /// <summary>
    /// How long one read of a client stream (a Put waiting for its next message) or one flush of a response stream (a
    /// Get, SubscribeEvents or Watch whose client reads nothing) may wait on a client that is alive but stuck; then the
    /// call ends (Rpc.GrpcDispatcher.StreamStallTimeout). Keepalive catches dead peers; this catches live ones.
    /// </summary>
    public TimeSpan StreamStallTimeout { get; init; } = KvFabric.Rpc.GrpcDispatcher.DefaultStreamStallTimeout;

    /// <summary>
    /// At SIGTERM, how long calls doing work (Put, Get, Fetch, ...) get to finish; those still running then end as
    /// UNAVAILABLE. Watch streams do not wait for it, and new calls are refused at once.
    /// </summary>
    public TimeSpan ShutdownDrain { get; init; } = TimeSpan.FromSeconds(5);
    public int MaxReceiveMessageBytes { get; init; } = 4 << 20;
    public int MaxSendMessageBytes { get; init; } = 4 << 20;
    public bool LockInRam { get; init; }
    /// <summary>Serve grpc.reflection (v1 and v1alpha), so grpcurl and other generic clients find the API's schema.</summary>
    public bool Reflection { get; init; } = true;
    /// <summary>Structured logs as one JSON object per line (for log shippers) instead of text lines.</summary>
    public bool JsonLogs { get; init; }
    /// <summary>The cluster store: "none" (standalone, the default), "inproc" (a cluster of this process alone), "etcd".</summary>
    public string Cluster { get; init; } = "none";
    /// <summary>etcd's client URL (cluster = etcd).</summary>
    public string EtcdEndpoint { get; init; } = "http://127.0.0.1:2379";
    /// <summary>Names the cluster inside the store, so clusters can share one etcd.</summary>
    public string ClusterName { get; init; } = "kvfabric";
    public TimeSpan ClusterLeaseTtl { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>The admin tenant nodes call each other as (configured on every node); null: the first admin tenant.</summary>
    public string? ClusterTenant { get; init; }
    /// <summary>The address peers reach this node's gRPC at; null: http(s)://listen:bound-port.</summary>
    public string? Advertise { get; init; }

    public bool Clustered => Cluster != "none";

    /// <summary>The admin tenant the cluster's nodes call each other as.</summary>
    public TenantConfig ClusterCredentials =>
        (ClusterTenant is null ? EffectiveTenants.FirstOrDefault(t => t.Admin) : EffectiveTenants.FirstOrDefault(t => t.Name == ClusterTenant))
        ?? throw new ArgumentException(ClusterTenant is null
            ? "a clustered node needs an admin tenant (admin: true) for the nodes to call each other as; configure one on every node"
            : $"cluster_tenant '{ClusterTenant}' is not a configured tenant");

    /// <summary>A Llama-3-8B-like layout: 32 layers, 8 KV heads of 128, bf16, 16 tokens per block = 2 MiB blocks.</summary>
    public static KvLayout DefaultLayout { get; } = new("llama-3-8b-like", 32, 8, 128, KvDType.BF16, 16);

    public static readonly TenantConfig DevTenant = new("dev", "dev", Admin: true);

    /// <summary>Checks the options as a whole; the message says what to change.</summary>
    public SidecarOptions Validate()
    {
        if (string.IsNullOrWhiteSpace(Node) || string.IsNullOrWhiteSpace(Worker) || Node.Contains('/', StringComparison.Ordinal))
            throw new ArgumentException($"node and worker must be non-empty names (node without '/'); got node '{Node}', worker '{Worker}'");
        if (Dev && !IPAddress.IsLoopback(Listen))
            throw new ArgumentException($"--dev serves a tenant with the well-known token 'dev' and binds loopback only; got listen address {Listen}. Drop --dev and configure tenants to listen elsewhere.");
        if (!Dev && Tenants.Count == 0)
            throw new ArgumentException("no tenants are configured: add tenants (name, token) to the config file or KVFABRIC_TENANTS__0__NAME/TOKEN, or run with --dev");
        if (Port is < 0 or > 65535)
            throw new ArgumentException($"--port must be 0..65535; got {Port}");
        if (MetricsPort is < -1 or > 65535)
            throw new ArgumentException($"--metrics-port must be -1 (off) or 0..65535; got {MetricsPort}");
        if (TransferPort is < 0 or > 65535)
            throw new ArgumentException($"--transfer-port (transfer_port) must be 0..65535 (0: any free port); got {TransferPort}");
        if (GpuDevice < 0)
            throw new ArgumentException($"gpu_device must be a CUDA device number (0, 1, ...); got {GpuDevice}");
        if (Dev && Tenants.FirstOrDefault(t => t.Name == DevTenant.Name || t.Token == DevTenant.Token) is { } clash)
            throw new ArgumentException($"tenant '{clash.Name}' clashes with --dev's tenant 'dev' (token 'dev'): rename it and give it another token, or drop --dev");
        if (EffectiveTenants.Count > 0)
            _ = new TenantRegistry(EffectiveTenants); // duplicate names or tokens, empty names or tokens: the message says which
        if (HostCapacityBytes < Layout.BlockBytes)
            throw new ArgumentException($"host capacity ({HostCapacityBytes} bytes) must hold at least one block of {Layout.BlockBytes} bytes");
        if (GpuCapacityBytes < 0 || (GpuCapacityBytes > 0 && GpuCapacityBytes < Layout.BlockBytes))
            throw new ArgumentException($"gpu capacity ({GpuCapacityBytes} bytes) must be 0 (no GPU tier) or hold at least one block of {Layout.BlockBytes} bytes");
        if (SsdDirectory is not null && SsdCapacityBytes < Layout.BlockBytes)
            throw new ArgumentException($"ssd capacity ({SsdCapacityBytes} bytes) must hold at least one block of {Layout.BlockBytes} bytes");
        if (SsdAdmission is not ("always" or "seen-twice"))
            throw new ArgumentException($"ssd_admission must be 'always' or 'seen-twice'; got '{SsdAdmission}'");
        if (PutStagingBlocks is < 1 or > 65536)
            throw new ArgumentException($"put_staging_blocks must be 1..65536; got {PutStagingBlocks}");
        if (ReadBuffers is < 1 or > 65536)
            throw new ArgumentException($"read_buffers must be 1..65536; got {ReadBuffers}");
        foreach (var (key, policy) in new[] { ("policy (--policy)", Policy), ("ssd_policy", SsdPolicy) })
        {
            try
            {
                _ = KvFabric.Tiers.Policies.PolicyFactory.Create(policy, 1, Layout.TokensPerBlock); // fails with the list of names
            }
            catch (ArgumentException e)
            {
                throw new ArgumentException($"{key}: {e.Message}", e);
            }
        }
        if (EventLogCapacity is < 1 or > 1 << 24)
            throw new ArgumentException($"event_log_capacity must be 1..{1 << 24}; got {EventLogCapacity}");
        if (StagingSlots is < 1 or > 65536)
            throw new ArgumentException($"staging slots must be 1..65536; got {StagingSlots}");
        if (StagingSlotsPerTenant is { } per && (per < 1 || per > StagingSlots))
            throw new ArgumentException($"staging_slots_per_tenant must be 1..staging_slots ({StagingSlots}); got {per}");
        if (KeepAlive < TimeSpan.FromSeconds(1))
            throw new ArgumentException($"keepalive_s must be at least 1 second; got {KeepAlive.TotalSeconds}");
        if (StreamStallTimeout < TimeSpan.FromSeconds(1))
            throw new ArgumentException($"stream_stall_timeout_s must be at least 1 second; got {StreamStallTimeout.TotalSeconds}");
        if (ShutdownDrain < TimeSpan.Zero || ShutdownDrain > TimeSpan.FromHours(1))
            throw new ArgumentException($"shutdown_drain_s must be 0 (end running calls at once) to 3600 seconds; got {ShutdownDrain.TotalSeconds}");
        if (MaxReceiveMessageBytes < 64 * 1024 || MaxSendMessageBytes < 64 * 1024)
            throw new ArgumentException("max message sizes must be at least 64 KiB");
        if (Cluster == "etcd" && Advertise is null && (Listen.Equals(IPAddress.Any) || Listen.Equals(IPAddress.IPv6Any)))
            throw new ArgumentException($"listen {Listen} is every address, which other nodes cannot dial: set advertise to the URL they reach this "
                + "node's gRPC port at (e.g. http://10.0.0.5:50051)");
        if (Advertise is not null && !(Uri.TryCreate(Advertise.Contains("://", StringComparison.Ordinal) ? Advertise : "http://" + Advertise, UriKind.Absolute, out Uri? advertised)
                                       && advertised.Scheme is "http" or "https" && advertised.Host.Length > 0))
            throw new ArgumentException($"advertise must be host:port or an http(s) URL such as http://10.0.0.5:50051; got '{Advertise}' "
                + "(the other nodes would ignore this node)");
        if (Cluster is not ("none" or "inproc" or "etcd"))
            throw new ArgumentException($"cluster must be 'none', 'inproc' or 'etcd'; got '{Cluster}'");
        if (Clustered)
        {
            if (!ClusterCredentials.Admin)
                throw new ArgumentException($"cluster_tenant '{ClusterCredentials.Name}' must be an admin tenant (admin: true): nodes read each other's events and memory as it");
            if (ClusterLeaseTtl < TimeSpan.FromSeconds(1) || ClusterLeaseTtl > TimeSpan.FromMinutes(10))
                throw new ArgumentException($"cluster_lease_ttl_s must be 1..600 seconds; got {ClusterLeaseTtl.TotalSeconds}");
        }

        if ((TlsCertificate is null) != (TlsKey is null))
            throw new ArgumentException("TLS needs both a certificate (tls:certificate) and its key (tls:key), PEM files");
        if (TlsCertificate is not null)
        {
            try
            {
                using var cert = System.Security.Cryptography.X509Certificates.X509Certificate2.CreateFromPemFile(TlsCertificate, TlsKey);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or System.Security.Cryptography.CryptographicException or ArgumentException)
            {
                throw new ArgumentException($"cannot load the TLS certificate (--tls-cert, tls:certificate = '{TlsCertificate}') with its key (--tls-key, tls:key = '{TlsKey}'): "
                    + $"{e.Message} Give PEM files that this user can read, the key matching the certificate.", e);
            }
        }

        return this;
    }

    public IReadOnlyList<TenantConfig> EffectiveTenants => Dev ? [DevTenant, .. Tenants] : Tenants;

    /// <summary>Reads options from a configuration tree (file + environment + flags merged by the caller).</summary>
    public static SidecarOptions From(IConfiguration c)
    {
        var d = new SidecarOptions();
        var tenants = c.GetSection("tenants").GetChildren()
            .Select(t => new TenantConfig(
                t["name"] ?? throw new ArgumentException($"tenant entry {t.Path} has no name"),
                t["token"] ?? throw new ArgumentException($"tenant '{t["name"]}' has no token"),
                Bool(t, "admin")))
            .ToList();
        IConfigurationSection l = c.GetSection("layout");
        KvLayout layout = l.Exists()
            ? new KvLayout(
                l["model"] ?? d.Layout.ModelFingerprint,
                Int(l, "layers", d.Layout.Layers),
                Int(l, "kv_heads", d.Layout.KvHeads),
                Int(l, "head_dim", d.Layout.HeadDim),
                l["dtype"] is { } dt ? KvDTypeExtensions.ParseWireName(dt) : d.Layout.DType,
                Int(l, "tokens_per_block", d.Layout.TokensPerBlock),
                Int(l, "tp_size", 1),
                Int(l, "tp_rank", 0))
            : d.Layout;
        return new SidecarOptions
        {
            Node = c["node"] ?? d.Node,
            Worker = c["worker"] ?? d.Worker,
            Listen = c["listen"] is { } listen
                ? (IPAddress.TryParse(listen, out var ip) ? ip : throw new ArgumentException($"listen must be an IP address; got '{listen}'"))
                : d.Listen,
            Port = Int(c, "port", d.Port),
            MetricsPort = Int(c, "metrics_port", d.MetricsPort),
            TransferPort = Int(c, "transfer_port", d.TransferPort),
            Dev = Bool(c, "dev"),
            TlsCertificate = c["tls:certificate"],
            TlsKey = c["tls:key"],
            Tenants = tenants,
            Layout = layout,
            HostCapacityBytes = Bytes(c, "host_capacity", d.HostCapacityBytes),
            GpuCapacityBytes = Bytes(c, "gpu_capacity", d.GpuCapacityBytes),
            GpuDevice = Int(c, "gpu_device", d.GpuDevice),
            SsdDirectory = c["ssd_dir"] ?? d.SsdDirectory,
            SsdCapacityBytes = Bytes(c, "ssd_capacity", d.SsdCapacityBytes),
            Policy = c["policy"] ?? d.Policy,
            SsdPolicy = c["ssd_policy"] ?? d.SsdPolicy,
            SsdAdmission = c["ssd_admission"] ?? d.SsdAdmission,
            SsdVerifyOnOpen = Bool(c, "ssd_verify_on_open"),
            WriteThrough = Bool(c, "write_through"),
            RecomputeMsPerBlock = Double(c, "recompute_ms_per_block"),
            RecomputeMsPerBlockPerDepth = Double(c, "recompute_ms_per_block_per_depth"),
            PutStagingBlocks = Int(c, "put_staging_blocks", d.PutStagingBlocks),
            ReadBuffers = Int(c, "read_buffers", d.ReadBuffers),
            StagingSlots = Int(c, "staging_slots", d.StagingSlots),
            StagingSlotsPerTenant = c["staging_slots_per_tenant"] is null ? d.StagingSlotsPerTenant : Int(c, "staging_slots_per_tenant", 0),
            EventLogCapacity = Int(c, "event_log_capacity", d.EventLogCapacity),
            KeepAlive = Seconds(c, "keepalive_s") ?? d.KeepAlive,
            StreamStallTimeout = Seconds(c, "stream_stall_timeout_s") ?? d.StreamStallTimeout,
            ShutdownDrain = Seconds(c, "shutdown_drain_s") ?? d.ShutdownDrain,
            MaxReceiveMessageBytes = c["max_receive_message"] is { } r ? MessageSize(r, "max_receive_message") : d.MaxReceiveMessageBytes,
            MaxSendMessageBytes = c["max_send_message"] is { } s ? MessageSize(s, "max_send_message") : d.MaxSendMessageBytes,
            LockInRam = Bool(c, "lock_in_ram"),
            Reflection = c["reflection"] is null ? d.Reflection : Bool(c, "reflection"),
            JsonLogs = c["log_format"] switch
            {
                null => false,
                { } f when f.Equals("json", StringComparison.OrdinalIgnoreCase) => true,
                { } f when f.Equals("text", StringComparison.OrdinalIgnoreCase) => false,
                { } f => throw new ArgumentException($"log_format (--log-format) must be 'text' or 'json'; got '{f}'"),
            },
            Cluster = c["cluster"] ?? d.Cluster,
            EtcdEndpoint = c["etcd_endpoint"] ?? d.EtcdEndpoint,
            ClusterName = c["cluster_name"] ?? d.ClusterName,
            ClusterLeaseTtl = Seconds(c, "cluster_lease_ttl_s") ?? d.ClusterLeaseTtl,
            ClusterTenant = c["cluster_tenant"],
            Advertise = c["advertise"],
        };
    }

    private static int Int(IConfiguration c, string key, int fallback)
    {
        string? v = c[key];
        if (v is null)
            return fallback;
        return int.TryParse(v, NumberStyles.Integer, CultureInfo.InvariantCulture, out int n)
            ? n
            : throw new ArgumentException($"{PathOf(c)}{key} must be an integer; got '{v}'");
    }

    /// <summary>A boolean option: absent is false; anything but true or false is refused (a "1" or "yes" must not silently mean false).</summary>
    private static bool Bool(IConfiguration c, string key) =>
        c[key] is not { } v ? false
        : bool.TryParse(v, out bool b) ? b
        : throw new ArgumentException($"{PathOf(c)}{key} must be true or false; got '{v}'");

    private static long Bytes(IConfiguration c, string key, long fallback)
    {
        if (c[key] is not { } v)
            return fallback;
        try
        {
            return ParseBytes(v);
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"{PathOf(c)}{key}: {e.Message}", e);
        }
    }

    private static TimeSpan? Seconds(IConfiguration c, string key) =>
        Double(c, key) is not { } s ? null
        : s <= MaxSeconds ? TimeSpan.FromSeconds(s)
        : throw new ArgumentException($"{PathOf(c)}{key} must be at most {MaxSeconds} seconds (30 days); got '{c[key]}'");

    /// <summary>The longest duration an option in seconds takes (timers and clocks stay far from overflowing).</summary>
    private const double MaxSeconds = 30 * 24 * 3600;

    private static int MessageSize(string text, string key)
    {
        long bytes;
        try
        {
            bytes = ParseBytes(text);
        }
        catch (ArgumentException e)
        {
            throw new ArgumentException($"{key}: {e.Message}", e);
        }

        return bytes <= 1 << 30 ? (int)bytes : throw new ArgumentException($"{key} is {text}; gRPC messages here are at most 1GiB");
    }

    private static double? Double(IConfiguration c, string key) =>
        c[key] is not { } v ? null
        : double.TryParse(v, NumberStyles.Float, CultureInfo.InvariantCulture, out double d) && d >= 0 && double.IsFinite(d) ? d
        : throw new ArgumentException($"{PathOf(c)}{key} must be a number >= 0; got '{v}'");

    private static string PathOf(IConfiguration c)
    {
        string? path = (c as IConfigurationSection)?.Path;
        return string.IsNullOrEmpty(path) ? string.Empty : path + ":";
    }

    /// <summary>Parses a byte size as configuration writes it (see <see cref="Memory.ByteSize.Parse"/>).</summary>
    public static long ParseBytes(string text) => Memory.ByteSize.Parse(text);
}
