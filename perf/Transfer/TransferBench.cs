using System.Diagnostics;
using KvFabric.Bench.Reporting;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;

namespace KvFabric.Bench.Transfer;

public sealed record TransferBenchOptions
{
    public BackendKind Backend { get; init; } = BackendKind.Tcp;
    public TransferOp Op { get; init; } = TransferOp.Write;
    public long BlockBytes { get; init; } = 2 << 20;
    public int Blocks { get; init; } = 256;
    public int Batch { get; init; } = 32;
    public int Streams { get; init; } = 1;
    public int Runs { get; init; } = 5;
    /// <summary>Each run moves every block this many times (a small, cache-resident working set re-sent, as iperf3 does).</summary>
    public int Repeat { get; init; } = 1;
    /// <summary>Requests posted concurrently (each its own prepared request over the same blocks).</summary>
    public int Inflight { get; init; } = 1;
    public int Warmups { get; init; } = 1;
    /// <summary>Warm-up runs go on (at least Warmups of them) until this much time passed.</summary>
    public TimeSpan WarmUp { get; init; } = TimeSpan.FromSeconds(2);
    public ChecksumKind Checksum { get; init; } = ChecksumKind.None;
    /// <summary>UCX_TLS of both processes with the UCX backend (tcp, posix,self, sm,self, ...).</summary>
    public string UcxTls { get; init; } = "tcp";
    /// <summary>The peer's region is allocated by UCX (ucp_mem_map ALLOCATE) instead of an anonymous mapping.</summary>
    public bool UcxAllocate { get; init; }
}

public sealed record TransferBenchResult(
    TransferBenchOptions Options,
    Spread Gbps,
    double MedianRunSeconds,
    double BlocksPerSecond,
    double BatchLatencyP50Us,
    double BatchLatencyP99Us,
    double InitiatorCpuSecondsPerGb,
    double PeerCpuSecondsPerGb)
{
    /// <summary>With the UCX backend: the transports the endpoint really used (ucp_ep_print_info lanes).</summary>
    public IReadOnlyList<string> UcxTransports { get; init; } = [];
}

/// <summary>
/// Moves blocks between this process (the initiator) and a separate `kvfabric peer` process on loopback, like
/// nixlbench: every run moves all blocks once in batches of prepared requests, warm-up runs are excluded.
/// </summary>
public static class TransferBench
{
    public static async Task<TransferBenchResult> RunAsync(TransferBenchOptions o, Action<string>? progress = null, CancellationToken ct = default)
    {
        if (o.BlockBytes > int.MaxValue || o.BlockBytes < 1)
            throw new ArgumentOutOfRangeException(nameof(o), o.BlockBytes, "block size must be within 1 B..2 GiB");
        if (o.Blocks < 1 || o.Batch < 1 || o.Runs < 1 || o.Repeat < 1 || o.Inflight < 1)
            throw new ArgumentOutOfRangeException(nameof(o), "blocks, batch, runs, repeat and inflight must be positive");
        long total = o.BlockBytes * o.Blocks;
        long regionMib = Math.Max(1, (total + (1 << 20) - 1) >> 20);
        // The peer runs steady-state code too (this process is built with tiered compilation off).
        bool ucx = o.Backend == BackendKind.Ucx;
        var peerEnv = new Dictionary<string, string> { ["DOTNET_TieredCompilation"] = "0" };
        if (ucx)
            peerEnv["UCX_TLS"] = o.UcxTls;
        await using var peer = await TransferPeerProcess.StartAsync(regionMib, shm: o.Backend == BackendKind.SharedMemory,
            ucx ? (o.UcxAllocate ? ["--ucx", "--ucx-alloc"] : ["--ucx"]) : null, environment: peerEnv).ConfigureAwait(false);
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = (int)o.BlockBytes, SlotCount = o.Blocks });
        await using var agent = new TransferAgent(new TransferAgentOptions
        {
            Name = "bench",
            MaxChunkBytes = (int)Math.Clamp(o.BlockBytes, 4096, 64 << 20),
            EnableUcx = ucx,
            UcxSettings = ucx ? new Dictionary<string, string> { ["TLS"] = o.UcxTls } : null,
        });
        if (ucx && !agent.UcxAvailable)
            throw new InvalidOperationException($"--backend ucx: {agent.UcxUnavailableReason}");
        agent.Register(pool);
        var remote = await agent.LoadRemoteAsync(peer.Metadata).ConfigureAwait(false);
        // Touch every page on both sides so page faults are not timed.
        for (int i = 0; i < o.Blocks; i++)
            DataPattern.Fill(pool.SlotAt(i).AsSpan(), 1, (long)i * o.BlockBytes);
        Require(await peer.CommandAsync($"FILL 0 {total} 1").ConfigureAwait(false));

        // One prepared request per batch and in-flight slot: a request is posted by one slot at a time.
        var options = new TransferOptions { Backend = o.Backend, Streams = o.Streams, Checksum = o.Checksum, Deadline = TimeSpan.FromMinutes(2) };
        var batches = new List<TransferRequest[]>();
        for (int first = 0; first < o.Blocks; first += o.Batch)
        {
            int n = Math.Min(o.Batch, o.Blocks - first);
            var local = new MemoryDescriptor[n];
            var remoteDescs = new MemoryDescriptor[n];
            for (int k = 0; k < n; k++)
            {
                local[k] = MemoryDescriptor.Of(pool.SlotAt(first + k).Address, o.BlockBytes);
                remoteDescs[k] = peer.Remote((first + k) * o.BlockBytes, o.BlockBytes);
            }
            batches.Add(Enumerable.Range(0, o.Inflight).Select(_ => agent.Prepare(o.Op, local, remote, remoteDescs, options)).ToArray());
        }
        int posts = batches.Count * o.Repeat;
        long moved = total * o.Repeat;

        var gbps = new List<double>();
        var runSeconds = new List<double>();
        var latencies = new List<double>();
        double cpuSelf = 0, cpuPeer = 0;
        long warmStart = Stopwatch.GetTimestamp();
        for (int r = 0; r < o.Warmups + o.Runs; r++)
        {
            // The last warm-up run repeats until the warm-up lasted WarmUp: with tiered compilation the hot paths need
            // that long to reach tier 1 (a 100 ms run alone was still partly timed on tier-0 code).
            if (r == o.Warmups && o.Warmups > 0 && Stopwatch.GetElapsedTime(warmStart) < o.WarmUp)
                r--;
            bool measured = r >= o.Warmups;
            progress?.Invoke(measured ? $"run {r - o.Warmups + 1}/{o.Runs}" : $"warm-up {r + 1}/{o.Warmups}");
            var cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
            double peer0 = ProcessCpu.Seconds(peer.Pid);
            var runLatencies = new List<double>[o.Inflight];
            long start = Stopwatch.GetTimestamp();
            var slots = new Task[o.Inflight];
            for (int w = 0; w < o.Inflight; w++)
            {
                int slot = w;
                runLatencies[slot] = [];
                slots[slot] = Task.Run(async () =>
                {
                    for (int i = slot; i < posts; i += o.Inflight)
                    {
                        long t0 = Stopwatch.GetTimestamp();
                        var result = await agent.PostAsync(batches[i % batches.Count][slot], ct).ConfigureAwait(false);
                        if (!result.IsSuccess)
                            throw new InvalidOperationException($"transfer failed during the benchmark: {result}");
                        runLatencies[slot].Add(Stopwatch.GetElapsedTime(t0).TotalMicroseconds);
                    }
                }, ct);
            }
            await Task.WhenAll(slots).ConfigureAwait(false);
            double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            if (!measured)
                continue;
            latencies.AddRange(runLatencies.SelectMany(l => l));
            gbps.Add(moved / seconds / 1e9);
            runSeconds.Add(seconds);
            cpuSelf += (Process.GetCurrentProcess().TotalProcessorTime - cpu0).TotalSeconds;
            cpuPeer += ProcessCpu.Seconds(peer.Pid) - peer0;
        }
        // The last run's bytes must be intact at the destination: a fast wrong answer is not a result.
        if (o.Op == TransferOp.Write)
            Require(await peer.CommandAsync($"VERIFY 0 {total} 1").ConfigureAwait(false));
        else
        {
            for (int i = 0; i < o.Blocks; i++)
            {
                if (DataPattern.FindMismatch(pool.SlotAt(i).AsSpan(), 1, (long)i * o.BlockBytes) >= 0)
                    throw new InvalidOperationException($"block {i} read back wrong");
            }
        }
        var lat = latencies.Order().ToArray();
        double gbMoved = moved * o.Runs / 1e9;
        return new TransferBenchResult(o, Spread.Of(gbps), Spread.Of(runSeconds).Median, (double)o.Blocks * o.Repeat / Spread.Of(runSeconds).Median,
            Spread.Percentile(lat, 50), Spread.Percentile(lat, 99), cpuSelf / gbMoved, cpuPeer / gbMoved)
        { UcxTransports = remote.UcxTransports };
    }

    private static void Require(string reply)
    {
        if (reply != "OK")
            throw new InvalidOperationException($"the peer answered '{reply}'");
    }
}
