using System.Runtime.InteropServices;
using KvFabric.Client;
using KvFabric.Cluster;
using KvFabric.Sidecar;
using KvFabric.Workers.Model;
using KvFabric.Workers.Serving;
using Microsoft.Extensions.Logging;

namespace KvFabric.Workers.Driver;

public sealed record DeploymentOptions
{
    /// <summary>Prefill workers; each has its own sidecar (a node of the cluster) so Route can tell where a prefix is.</summary>
    public int PrefillWorkers { get; init; } = 2;
    public int DecodeWorkers { get; init; } = 1;
    /// <summary>Instead of prefill and decode workers: this many colocated workers (prefill and decode in one process: the baseline).</summary>
    public int ColocatedWorkers { get; init; }
    public string Model { get; init; } = "small";
    public int MaxBatch { get; init; } = 16;
    /// <summary>Tiers of each sidecar, in blocks: an emulated GPU tier (host memory; named so), host DRAM, and SSD (in SsdDirectory).</summary>
    public int GpuBlocks { get; init; } = 256;
    public int HostBlocks { get; init; } = 1024;
    public int SsdBlocks { get; init; } = 8192;
    /// <summary>Root of the SSD tiers' directories (one per node); null: no SSD tier.</summary>
    public string? SsdDirectory { get; init; }
    /// <summary>Pin decode workers to their own CPU (the last one) and everything else to the others, so decode steps are not preempted by prefill compute.</summary>
    public bool PinCpus { get; init; } = true;
    public string Transfer { get; init; } = "auto";
    /// <summary>Fault injection (tests): prefill worker 0 corrupts its Nth transfer payload.</summary>
    public int CorruptNthPayload { get; init; }
    public string Tenant { get; init; } = "dev";
    public string Token { get; init; } = "dev";
    public ILoggerFactory? Logs { get; init; }
}

/// <summary>
/// A single-machine deployment on loopback: sidecars hosted in this process (one node each, sharing an in-process cluster
/// store, so each node's index sees every node's blocks), and prefill, decode (or colocated) workers as separate
/// `kvfabric-worker serve` processes. What the demo, the e2e bench and the integration tests run.
/// </summary>
public sealed class Deployment : IAsyncDisposable
{
    private readonly DeploymentOptions _options;
    private readonly List<SidecarHost> _sidecars = [];
    private readonly List<SidecarOptions> _sidecarOptions = [];
    private readonly InProcessClusterStore? _cluster;
    private readonly List<ServiceProcess> _processes = [];
    private readonly Dictionary<string, ServiceProcess> _byName = new(StringComparer.Ordinal);

    private Deployment(DeploymentOptions options)
    {
        _options = options;
        ModelConfig = ModelConfigs.Get(options.Model);
        if (options.ColocatedWorkers == 0 && options.PrefillWorkers > 1)
            _cluster = new InProcessClusterStore("demo");
    }

    public ModelConfig ModelConfig { get; }
    public IReadOnlyList<SidecarHost> Sidecars => _sidecars;
    public List<WorkerClient> Prefill { get; } = [];
    public List<WorkerClient> Decode { get; } = [];
    public List<WorkerClient> Colocated { get; } = [];
    public FabricClient IndexClient { get; private set; } = null!;
    /// <summary>The CPUs workers were pinned to, as "role: cpus" (empty when not pinned).</summary>
    public string Placement { get; private set; } = "not pinned";

    public static async Task<Deployment> StartAsync(DeploymentOptions options, CancellationToken cancellationToken = default)
    {
        var d = new Deployment(options);
        try
        {
            await d.StartCoreAsync(cancellationToken).ConfigureAwait(false);
            return d;
        }
        catch
        {
            await d.DisposeAsync().ConfigureAwait(false);
            throw;
        }
    }

    private async Task StartCoreAsync(CancellationToken cancellationToken)
    {
        // The CPUs this process may use (a container or cgroup may allow, say, 4-7 only), not 0..N-1.
        int[] allowed = CpuAffinity.Allowed();
        bool pin = _options.PinCpus && allowed.Length >= 2;
        int[] decodeCpus = pin ? [allowed[^1]] : [];
        int[] otherCpus = pin ? allowed[..^1] : [];
        if (pin)
        {
            CpuAffinity.PinCurrentProcess(otherCpus); // the sidecars and the driver live here
            Placement = $"decode/colocated workers on CPU {allowed[^1]}; prefill workers, sidecars and the driver on CPU {string.Join(',', otherCpus)}";
        }

        int nodes = _options.ColocatedWorkers > 0 ? _options.ColocatedWorkers : _options.PrefillWorkers;
        long blockBytes = ModelConfig.ToKvLayout().BlockBytes;
        for (int i = 0; i < nodes; i++)
        {
            string role = _options.ColocatedWorkers > 0 ? "colocated" : "prefill";
            var so = new SidecarOptions
            {
                Node = $"node-{i}", Worker = $"{role}-{i}", Port = 0, MetricsPort = -1, Dev = true, Layout = ModelConfig.ToKvLayout(),
                GpuCapacityBytes = _options.GpuBlocks * blockBytes, HostCapacityBytes = _options.HostBlocks * blockBytes,
                SsdDirectory = _options.SsdDirectory is null ? null : Path.Combine(_options.SsdDirectory, $"node-{i}"),
                SsdCapacityBytes = _options.SsdBlocks * blockBytes,
                Cluster = _cluster is null ? "none" : "inproc", ClusterName = "demo", ClusterLeaseTtl = TimeSpan.FromSeconds(5),
            };
            _sidecarOptions.Add(so);
            _sidecars.Add(await StartSidecarAsync(so, cancellationToken).ConfigureAwait(false));
        }

        IndexClient = FabricClient.Connect($"http://{_sidecars[0].GrpcEndpoint}", _options.Tenant, _options.Token);
        var starts = new List<Task<WorkerClient>>();
        if (_options.ColocatedWorkers > 0)
        {
            for (int i = 0; i < _options.ColocatedWorkers; i++)
                starts.Add(StartWorkerAsync(WorkerRole.Colocated, $"colocated-{i}", $"http://{_sidecars[i].GrpcEndpoint}", decodeCpus, 0, cancellationToken));
        }
        else
        {
            for (int i = 0; i < _options.PrefillWorkers; i++)
                starts.Add(StartWorkerAsync(WorkerRole.Prefill, $"prefill-{i}", $"http://{_sidecars[i].GrpcEndpoint}", otherCpus, i == 0 ? _options.CorruptNthPayload : 0, cancellationToken));
            for (int i = 0; i < _options.DecodeWorkers; i++)
                starts.Add(StartWorkerAsync(WorkerRole.Decode, $"decode-{i}", null, decodeCpus, 0, cancellationToken));
        }

        foreach (WorkerClient w in await Task.WhenAll(starts).ConfigureAwait(false))
            (w.Name.StartsWith("prefill", StringComparison.Ordinal) ? Prefill : w.Name.StartsWith("decode", StringComparison.Ordinal) ? Decode : Colocated).Add(w);
    }

    private async Task<SidecarHost> StartSidecarAsync(SidecarOptions options, CancellationToken cancellationToken)
    {
        var host = new SidecarHost(options, _options.Logs, _cluster?.CreatePeer());
        await host.StartAsync(cancellationToken).ConfigureAwait(false);
        return host;
    }

    private async Task<WorkerClient> StartWorkerAsync(WorkerRole role, string name, string? sidecar, int[] cpus, int corrupt, CancellationToken cancellationToken)
    {
        var args = new List<string>
        {
            "--role", role.ToString().ToLowerInvariant(), "--name", name, "--model", _options.Model, "--threads", "1", "--port", "0",
            "--max-batch", _options.MaxBatch.ToString(System.Globalization.CultureInfo.InvariantCulture), "--transfer", _options.Transfer,
            "--tenant", _options.Tenant, "--token", _options.Token,
        };
        if (sidecar is not null)
            args.AddRange(["--sidecar", sidecar]);
        if (corrupt > 0)
            args.AddRange(["--corrupt-nth-payload", corrupt.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        cancellationToken.ThrowIfCancellationRequested();
        ServiceProcess p = await ServiceProcess.StartAsync("kvfabric-worker.dll", "serve", args, cpus: cpus).ConfigureAwait(false);
        lock (_processes)
        {
            _processes.Add(p);
            _byName[name] = p;
        }

        return new WorkerClient(name, p.GrpcAddress, _options.Tenant, _options.Token);
    }

    /// <summary>The process of a worker (to kill it in a fault test).</summary>
    public ServiceProcess ProcessOf(string worker) => _byName[worker];

    /// <summary>Stops sidecar i and starts it again on the same port (its SSD tier, if any, survives; its memory tiers start empty).</summary>
    public async Task RestartSidecarAsync(int i, TimeSpan downtime, CancellationToken cancellationToken = default)
    {
        int port = _sidecars[i].GrpcEndpoint!.Port;
        await _sidecars[i].DisposeAsync().ConfigureAwait(false);
        await Task.Delay(downtime, cancellationToken).ConfigureAwait(false);
        _sidecarOptions[i] = _sidecarOptions[i] with { Port = port };
        _sidecars[i] = await StartSidecarAsync(_sidecarOptions[i], cancellationToken).ConfigureAwait(false);
    }

    public async ValueTask DisposeAsync()
    {
        foreach (WorkerClient w in Prefill.Concat(Decode).Concat(Colocated))
            w.Dispose();
        await Task.WhenAll(_processes.Select(async p =>
        {
            try
            {
                await p.DisposeAsync().ConfigureAwait(false);
            }
            catch (InvalidOperationException)
            {
                // already gone
            }
        })).ConfigureAwait(false);
        IndexClient?.Dispose();
        foreach (SidecarHost s in _sidecars)
            await s.DisposeAsync().ConfigureAwait(false);
        if (_cluster is not null)
            await _cluster.DisposeAsync().ConfigureAwait(false);
    }
}

/// <summary>CPU pinning of this process (every thread it has now; threads made later inherit their creator's set).</summary>
public static partial class CpuAffinity
{
    [LibraryImport("libc", EntryPoint = "sched_setaffinity", SetLastError = true)]
    private static partial int SchedSetAffinity(int tid, nint size, ref ulong mask);

    /// <summary>The CPUs this process may run on (its affinity; at most the first 64).</summary>
    public static int[] Allowed()
    {
        if (!OperatingSystem.IsLinux() && !OperatingSystem.IsWindows())
            return [.. Enumerable.Range(0, Math.Min(64, Environment.ProcessorCount))];
        long mask = (long)System.Diagnostics.Process.GetCurrentProcess().ProcessorAffinity;
        var cpus = new List<int>();
        for (int c = 0; c < 64; c++)
        {
            if ((mask & (1L << c)) != 0)
                cpus.Add(c);
        }

        return [.. cpus];
    }

    public static void PinCurrentProcess(IReadOnlyList<int> cpus)
    {
        if (!OperatingSystem.IsLinux() || cpus.Count == 0)
            return;
        ulong mask = 0;
        foreach (int c in cpus)
            mask |= c < 64 ? 1UL << c : 0;
        foreach (string task in Directory.EnumerateDirectories("/proc/self/task"))
        {
            if (int.TryParse(Path.GetFileName(task), out int tid))
                _ = SchedSetAffinity(tid, sizeof(ulong), ref mask); // a thread that just ended is no error
        }
    }
}
