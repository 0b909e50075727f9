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
    /// <summary>Extra `serve` flags for the named workers (e.g. "decode-0": --drain-seconds 30); they come after the deployment's own.</summary>
    public IReadOnlyDictionary<string, string[]>? WorkerArgs { get; init; }
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
    private readonly List<WorkerClient> _clients = []; // every client made, also of a start that failed part-way
    private ulong[]? _affinityBefore; // this process's CPU mask before it pinned itself; restored on disposal

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
        catch (Exception start)
        {
            // Whatever did start (workers, their clients, sidecars) goes, and the CPU mask comes back, before the caller hears why.
            try
            {
                await d.DisposeAsync().ConfigureAwait(false);
            }
            catch (Exception dispose)
            {
                throw new AggregateException($"the deployment did not start ({start.Message}), and cleaning up after it failed too ({dispose.Message})", start, dispose);
            }

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
            _affinityBefore = CpuAffinity.Current();
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
        try
        {
            await host.StartAsync(cancellationToken).ConfigureAwait(false);
        }
        catch (Exception start)
        {
            // Not in _sidecars yet, so DisposeAsync would never reach it: its transfer agent, staging memory and (when the
            // failure came after it) its gRPC server would outlive the failed start.
            try
            {
                await host.DisposeAsync().ConfigureAwait(false);
            }
            catch (Exception dispose)
            {
                throw new AggregateException($"sidecar {options.Node} did not start ({start.Message}), and stopping what it had opened failed too ({dispose.Message})", start, dispose);
            }

            throw;
        }

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
        if (_options.WorkerArgs?.GetValueOrDefault(name) is { } extra)
            args.AddRange(extra);
        cancellationToken.ThrowIfCancellationRequested();
        ServiceProcess p;
        try
        {
            p = await ServiceProcess.StartAsync("kvfabric-worker.dll", "serve", args, cpus: cpus).ConfigureAwait(false);
        }
        catch (InvalidOperationException e)
        {
            throw new InvalidOperationException($"worker {name} did not start: {e.Message}", e);
        }

        var client = new WorkerClient(name, p.GrpcAddress, _options.Tenant, _options.Token);
        lock (_processes)
        {
            _processes.Add(p);
            _byName[name] = p;
            _clients.Add(client);
        }

        return client;
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

    /// <summary>
    /// Stops everything this deployment started (worker processes, their clients, sidecars, the cluster store) and gives
    /// this process its CPU mask back. Each part is disposed even when another's disposal throws; the failures are
    /// thrown together at the end.
    /// </summary>
    public async ValueTask DisposeAsync()
    {
        var errors = new List<Exception>();
        List<WorkerClient> clients;
        List<ServiceProcess> processes;
        lock (_processes)
        {
            clients = [.. _clients];
            processes = [.. _processes];
        }

        foreach (WorkerClient w in clients)
            Try(w.Dispose);
        await Task.WhenAll(processes.Select(async p =>
        {
            try
            {
                await p.DisposeAsync().ConfigureAwait(false);
            }
            catch (InvalidOperationException)
            {
                // already gone
            }
            catch (Exception e)
            {
                lock (errors)
                    errors.Add(e);
            }
        })).ConfigureAwait(false);
        Try(() => IndexClient?.Dispose());
        foreach (SidecarHost s in _sidecars)
            await TryAsync(() => s.DisposeAsync()).ConfigureAwait(false);
        if (_cluster is not null)
            await TryAsync(() => _cluster.DisposeAsync()).ConfigureAwait(false);
        if (_affinityBefore is { } mask)
        {
            Try(() => CpuAffinity.Restore(mask));
            _affinityBefore = null;
        }

        if (errors.Count == 1)
            System.Runtime.ExceptionServices.ExceptionDispatchInfo.Throw(errors[0]);
        if (errors.Count > 1)
            throw new AggregateException("disposing the deployment failed in more than one part (everything else was disposed)", errors);

        void Try(Action dispose)
        {
            try
            {
                dispose();
            }
            catch (Exception e)
            {
                lock (errors)
                    errors.Add(e);
            }
        }

        async Task TryAsync(Func<ValueTask> dispose)
        {
            try
            {
                await dispose().ConfigureAwait(false);
            }
            catch (Exception e)
            {
                lock (errors)
                    errors.Add(e);
            }
        }
    }
}

/// <summary>
/// CPU pinning of this process (every thread it has now; threads made later inherit their creator's set). On Linux the
/// mask is as wide as the kernel's (sched_getaffinity), so CPUs past 63 count; elsewhere nothing is pinned and the
/// first 64 CPUs are reported allowed.
/// </summary>
public static partial class CpuAffinity
{
    private const int InitialMaskWords = 16; // 1,024 CPUs, glibc's cpu_set_t
    private const int MaxMaskWords = 1 << 12; // 262,144 CPUs: past the kernel's NR_CPUS limit

    [LibraryImport("libc", EntryPoint = "sched_setaffinity", SetLastError = true)]
    private static partial int SchedSetAffinity(int tid, nint size, ulong[] mask);

    [LibraryImport("libc", EntryPoint = "sched_getaffinity", SetLastError = true)]
    private static partial int SchedGetAffinity(int pid, nint size, ulong[] mask);

    /// <summary>The CPUs this process may run on (its affinity), in ascending order.</summary>
    public static int[] Allowed()
    {
        if (!OperatingSystem.IsLinux())
            return [.. Enumerable.Range(0, Math.Min(64, Environment.ProcessorCount))];
        ulong[] mask = Current()!;
        var cpus = new List<int>();
        for (int c = 0; c < mask.Length * 64; c++)
        {
            if ((mask[c >> 6] & (1UL << (c & 63))) != 0)
                cpus.Add(c);
        }

        return [.. cpus];
    }

    /// <summary>This process's CPU mask now, for <see cref="Restore"/> (null where nothing is pinned: not Linux).</summary>
    public static ulong[]? Current()
    {
        if (!OperatingSystem.IsLinux())
            return null;
        for (int words = InitialMaskWords; ; words *= 2)
        {
            var mask = new ulong[words];
            if (SchedGetAffinity(0, words * sizeof(ulong), mask) == 0)
                return mask;
            int errno = Marshal.GetLastPInvokeError();
            // EINVAL: the kernel's mask is wider than ours; try a wider one.
            if (errno != 22 || words >= MaxMaskWords)
                throw new InvalidOperationException($"sched_getaffinity failed (errno {errno}: {Marshal.GetPInvokeErrorMessage(errno)}); cannot read this process's CPU set to pin workers; run without CPU pinning");
        }
    }

    /// <summary>Gives every thread of this process the mask <see cref="Current"/> returned (undoes <see cref="PinCurrentProcess"/>).</summary>
    public static void Restore(ulong[]? mask)
    {
        if (mask is not null)
            SetAll(mask);
    }

    public static void PinCurrentProcess(IReadOnlyList<int> cpus)
    {
        if (cpus.Count == 0 || !OperatingSystem.IsLinux())
            return;
        var mask = new ulong[Math.Max(InitialMaskWords, cpus.Max() / 64 + 1)];
        foreach (int c in cpus)
        {
            ArgumentOutOfRangeException.ThrowIfNegative(c, nameof(cpus));
            mask[c >> 6] |= 1UL << (c & 63);
        }
        SetAll(mask);
    }

    private static void SetAll(ulong[] mask)
    {
        foreach (string task in Directory.EnumerateDirectories("/proc/self/task"))
        {
            if (int.TryParse(Path.GetFileName(task), out int tid))
                _ = SchedSetAffinity(tid, mask.Length * sizeof(ulong), mask); // a thread that just ended is no error
        }
    }
}
