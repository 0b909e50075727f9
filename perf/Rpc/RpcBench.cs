using System.Diagnostics;
using KvFabric.Bench.References;
using KvFabric.Bench.Reporting;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Sidecar;

namespace KvFabric.Bench.Rpc;

public sealed record RpcBenchOptions
{
    public int BlockBytes { get; init; } = 2 << 20;
    public int Blocks { get; init; } = 128;
    /// <summary>Blocks per streamed Put / Get call.</summary>
    public int BlocksPerCall { get; init; } = 8;
    public int Runs { get; init; } = 5;
    public int LookupCallers { get; init; } = 64;
    public int LookupChain { get; init; } = 32;
    public TimeSpan LookupDuration { get; init; } = TimeSpan.FromSeconds(3);
    /// <summary>
    /// When positive, a second Lookup phase: the same callers issue calls on a fixed schedule at this aggregate rate
    /// (open loop), and latency counts from each call's scheduled time, so a stall delays every call behind it.
    /// </summary>
    public double LookupRate { get; init; }
    /// <summary>Also drive Lookup with h2load (nghttp2's C load generator) as the callers: the server's latency with the
    /// cores nearly to itself.</summary>
    public bool H2load { get; init; } = true;
    /// <summary>Largest data chunk per Get response message; 0: the server's default (1 MiB).</summary>
    public uint GetChunkBytes { get; init; }
    /// <summary>
    /// Each phase repeats its warm-up run for at least this long before any run is timed. Both processes run with tiered
    /// compilation, as in production, so the hot paths must first be promoted to tier 1 (with dynamic PGO): with 2 s
    /// the first phase (Put) was still measured during the background compiles.
    /// </summary>
    public TimeSpan WarmUp { get; init; } = TimeSpan.FromSeconds(5);
}

public sealed record RpcBenchResult(
    Spread PutGbps,
    Spread GetGbps,
    double LookupCallsPerSecond,
    double LookupP50Us,
    double LookupP99Us,
    long LookupCalls,
    double LookupClientCpuUsPerCall,
    double LookupServerCpuUsPerCall,
    double GetClientCpuSecondsPerGb,
    double GetServerCpuSecondsPerGb,
    Spread PutSlotsGbps,
    Spread GetSlotsGbps)
{
    public double PutClientCpuSecondsPerGb { get; init; }
    public double PutServerCpuSecondsPerGb { get; init; }

    /// <summary>The open-loop phase at <see cref="RpcBenchOptions.LookupRate"/> (calls/s achieved, p50, p99), or null.</summary>
    public (double CallsPerSecond, double P50Us, double P99Us)? OpenLoop { get; init; }

    /// <summary>Lookup from h2load's callers (same chain, same number of concurrent calls) and the server's CPU per call
    /// meanwhile; null when not run. <see cref="H2loadNote"/> says why when h2load is missing.</summary>
    public (H2loadReference.Result Lookup, double ServerCpuUsPerCall)? H2load { get; init; }
    public string? H2loadNote { get; init; }
}

/// <summary>
/// Drives a `kvfabric serve` process over loopback with FabricClient: streamed Put and Get of whole blocks (GB/s) and
/// unary Lookup from many concurrent callers (calls/s, latency percentiles).
/// </summary>
public static class RpcBench
{
    public static async Task<RpcBenchResult> RunAsync(RpcBenchOptions o, Action<string> progress, CancellationToken ct)
    {
        if (o.Blocks % o.BlocksPerCall != 0)
            throw new ArgumentException($"--blocks ({o.Blocks}) must be a multiple of --blocks-per-call ({o.BlocksPerCall})");
        long capacity = (long)(o.Blocks + 2 * o.BlocksPerCall + 16) * o.BlockBytes;
        int units = o.BlockBytes / 8192;
        if (o.BlockBytes % 8192 != 0 || (units > 1024 && units % 1024 != 0))
            throw new ArgumentException($"block size {o.BlockBytes}: use a multiple of 8 KiB (and of 8 MiB above 8 MiB), e.g. 64KiB, 2MiB, 16MiB");
        int layers = Math.Min(units, 1024), heads = units / layers;
        var env = new Dictionary<string, string>
        {
            // A layout whose blocks are exactly BlockBytes: fp16, 16 tokens, head_dim 128 => 8 KiB per layer and KV head.
            ["KVFABRIC_LAYOUT__MODEL"] = "rpc-bench",
            ["KVFABRIC_LAYOUT__LAYERS"] = layers.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["KVFABRIC_LAYOUT__KV_HEADS"] = heads.ToString(System.Globalization.CultureInfo.InvariantCulture),
            ["KVFABRIC_LAYOUT__HEAD_DIM"] = "128",
            ["KVFABRIC_LAYOUT__DTYPE"] = "fp16",
            ["KVFABRIC_LAYOUT__TOKENS_PER_BLOCK"] = "16",
            ["KVFABRIC_HOST_CAPACITY"] = capacity.ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        progress("starting kvfabric serve");
        await using var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1", "--log-format", "text"], env);
        using var client = new FabricClient(new RpcChannelOptions
        {
            Address = new Uri(sidecar.GrpcAddress), Tenant = "dev", Token = "dev", DefaultDeadline = TimeSpan.FromMinutes(2),
        });

        // Distinct blocks, out of cache as a real working set would be.
        byte[] data = new byte[(long)o.Blocks * o.BlockBytes is var total && total <= Array.MaxLength ? (int)total : throw new ArgumentException("blocks x block size must be under 2 GiB")];
        new Random(1).NextBytes(data);
        byte[][] hashes = Enumerable.Range(0, o.Blocks).Select(i => System.Security.Cryptography.SHA256.HashData(BitConverter.GetBytes(i))[..16]).ToArray();
        byte[] packedAll = HashChain.Pack(hashes.Select(h => (ReadOnlyMemory<byte>)h));
        int calls = o.Blocks / o.BlocksPerCall;
        BlockToPut[][] perCall = Enumerable.Range(0, calls).Select(c => Enumerable.Range(c * o.BlocksPerCall, o.BlocksPerCall)
            .Select(i => new BlockToPut(hashes[i], i == 0 ? ReadOnlyMemory<byte>.Empty : hashes[i - 1], (uint)i,
                data.AsMemory(i * o.BlockBytes, o.BlockBytes))).ToArray()).ToArray();

        var put = new List<double>();
        double putClientCpu = 0, putServerCpu = 0;
        for (int run = 0, warm = Environment.TickCount; run <= o.Runs; run += run > 0 || Environment.TickCount - warm >= o.WarmUp.TotalMilliseconds ? 1 : 0)
        {
            progress($"put run {run}/{o.Runs}" + (run == 0 ? " (warm-up)" : string.Empty));
            await client.DeleteAsync(packedAll, new CallOptions(CancellationToken: ct));
            double c0 = ProcessCpu.Self, s0 = ProcessCpu.Seconds(sidecar.Pid);
            long start = Stopwatch.GetTimestamp();
            foreach (BlockToPut[] batch in perCall)
                await client.PutAsync(batch, new CallOptions(CancellationToken: ct));
            double s = Stopwatch.GetElapsedTime(start).TotalSeconds;
            if (run > 0)
            {
                put.Add(data.Length / s / 1e9);
                putClientCpu += ProcessCpu.Self - c0;
                putServerCpu += ProcessCpu.Seconds(sidecar.Pid) - s0;
            }
        }

        byte[] dest = new byte[o.BlocksPerCall * o.BlockBytes];
        var get = new List<double>();
        double getClientCpu = 0, getServerCpu = 0;
        for (int run = 0, warm = Environment.TickCount; run <= o.Runs; run += run > 0 || Environment.TickCount - warm >= o.WarmUp.TotalMilliseconds ? 1 : 0)
        {
            progress($"get run {run}/{o.Runs}" + (run == 0 ? " (warm-up)" : string.Empty));
            double c0 = ProcessCpu.Self, s0 = ProcessCpu.Seconds(sidecar.Pid);
            long start = Stopwatch.GetTimestamp();
            for (int c = 0; c < calls; c++)
            {
                ReadOnlyMemory<byte> chain = packedAll.AsMemory(c * o.BlocksPerCall * HashChain.HashBytes, o.BlocksPerCall * HashChain.HashBytes);
                await client.GetAsync(chain, dest, o.BlockBytes, o.GetChunkBytes, new CallOptions(CancellationToken: ct));
                if (run == 1 && c == 0 && !dest.AsSpan().SequenceEqual(data.AsSpan(0, dest.Length)))
                    throw new InvalidOperationException("Get returned different bytes than were put: the benchmark would measure a broken path");
            }

            double s = Stopwatch.GetElapsedTime(start).TotalSeconds;
            if (run > 0)
            {
                get.Add(data.Length / s / 1e9);
                getClientCpu += ProcessCpu.Self - c0;
                getServerCpu += ProcessCpu.Seconds(sidecar.Pid) - s0;
            }
        }

        var (putSlots, getSlots) = await SlotsAsync(client, o, data, hashes, packedAll, calls, progress, ct);

        progress($"lookup: {o.LookupCallers} concurrent callers for {o.LookupDuration.TotalSeconds:0} s");
        // Chains of LookupChain blocks whose first half is cached: a typical partial prefix hit.
        int cachedHalf = Math.Min(o.LookupChain / 2, o.Blocks);
        byte[] lookupChain = HashChain.Pack(hashes.Take(cachedHalf)
            .Concat(Enumerable.Range(0, o.LookupChain - cachedHalf).Select(i => System.Security.Cryptography.SHA256.HashData(BitConverter.GetBytes(-1 - i))[..16]))
            .Select(h => (ReadOnlyMemory<byte>)h));
        var expected = (uint)cachedHalf;
        // Warm up with the load itself, long enough for the runtime to tier the hot paths up (tier 1, with PGO).
        long warmEnd = Stopwatch.GetTimestamp() + (long)(o.WarmUp.TotalSeconds * Stopwatch.Frequency);
        await Task.WhenAll(Enumerable.Range(0, o.LookupCallers).Select(async _ =>
        {
            while (Stopwatch.GetTimestamp() < warmEnd)
                await client.LookupAsync(lookupChain, new CallOptions(CancellationToken: ct)).ConfigureAwait(false);
        }));
        var latencies = new List<double>[o.LookupCallers];
        long deadline = Stopwatch.GetTimestamp() + (long)(o.LookupDuration.TotalSeconds * Stopwatch.Frequency);
        double lc0 = ProcessCpu.Self, ls0 = ProcessCpu.Seconds(sidecar.Pid);
        long lookupStart = Stopwatch.GetTimestamp();
        await Task.WhenAll(Enumerable.Range(0, o.LookupCallers).Select(async caller =>
        {
            var mine = latencies[caller] = new List<double>(100_000);
            while (Stopwatch.GetTimestamp() < deadline)
            {
                long t0 = Stopwatch.GetTimestamp();
                var r = await client.LookupAsync(lookupChain, new CallOptions(CancellationToken: ct)).ConfigureAwait(false);
                mine.Add(Stopwatch.GetElapsedTime(t0).TotalMicroseconds);
                if (r.MatchedBlocks != expected)
                    throw new InvalidOperationException($"Lookup matched {r.MatchedBlocks} blocks, expected {expected}");
            }
        }));
        double lookupSeconds = Stopwatch.GetElapsedTime(lookupStart).TotalSeconds;
        double lookupClientCpu = ProcessCpu.Self - lc0, lookupServerCpu = ProcessCpu.Seconds(sidecar.Pid) - ls0;
        double[] all = latencies.SelectMany(l => l).Order().ToArray();
        (double, double, double)? openLoop = null;
        if (o.LookupRate > 0)
        {
            progress($"lookup: {o.LookupCallers} callers at {o.LookupRate:F0} calls/s in all, open loop, for {o.LookupDuration.TotalSeconds:0} s");
            openLoop = await OpenLoopAsync(client, lookupChain, expected, o, ct);
        }
        (H2loadReference.Result, double)? h2 = null;
        string? h2Note = null;
        if (o.H2load && !H2loadReference.IsInstalled())
            h2Note = ReferenceTools.Missing("h2load", H2loadReference.Package);
        else if (o.H2load)
        {
            progress($"lookup: h2load, {o.LookupCallers} concurrent streams for {o.LookupDuration.TotalSeconds:0} s");
            byte[] frame = GrpcFraming.ToFrame(new KvFabric.Rpc.V1.LookupRequest { Hashes = Google.Protobuf.ByteString.CopyFrom(lookupChain) });
            double s0 = ProcessCpu.Seconds(sidecar.Pid);
            var lookup = await H2loadReference.MeasureAsync(new Uri(sidecar.GrpcAddress), "kvfabric.v1.Fabric/Lookup", frame,
                new Dictionary<string, string> { ["authorization"] = "Bearer dev", [GrpcProtocol.TenantHeader] = "dev" },
                connections: 1, streams: o.LookupCallers, o.LookupDuration.TotalSeconds, minResponseBytes: GrpcProtocol.MessagePrefixBytes + 2 + cachedHalf, ct);
            // Includes the warm-up second: the CPU over every call made, not only the logged ones.
            double cpu = ProcessCpu.Seconds(sidecar.Pid) - s0;
            h2 = (lookup, cpu / (lookup.CallsPerSecond * (o.LookupDuration.TotalSeconds + H2loadReference.WarmUpSeconds)) * 1e6);
        }
        int code = await sidecar.StopAsync();
        if (code != 0)
            throw new InvalidOperationException($"kvfabric serve exited with {code}:\n{sidecar.Log}");
        double gb = (double)data.Length * o.Runs / 1e9;
        return new RpcBenchResult(Spread.Of(put), Spread.Of(get), all.Length / lookupSeconds,
            Spread.Percentile(all, 50), Spread.Percentile(all, 99), all.Length,
            lookupClientCpu / all.Length * 1e6, lookupServerCpu / all.Length * 1e6, getClientCpu / gb, getServerCpu / gb,
            Spread.Of(putSlots), Spread.Of(getSlots))
        {
            OpenLoop = openLoop, H2load = h2, H2loadNote = h2Note,
            PutClientCpuSecondsPerGb = putClientCpu / gb, PutServerCpuSecondsPerGb = putServerCpu / gb,
        };
    }

    // Caller c makes its k-th call at start + (k + c / callers) / (rate / callers): the callers interleave evenly. A call
    // that starts late because the caller was still waiting on its previous one is timed from when it should have
    // started (no coordinated omission); an idle caller times from when it actually sent.
    private static async Task<(double CallsPerSecond, double P50Us, double P99Us)> OpenLoopAsync(FabricClient client, byte[] chain, uint expected,
        RpcBenchOptions o, CancellationToken ct)
    {
        double perCaller = o.LookupRate / o.LookupCallers;
        long start = Stopwatch.GetTimestamp() + Stopwatch.Frequency / 10;
        long end = start + (long)(o.LookupDuration.TotalSeconds * Stopwatch.Frequency);
        var latencies = new List<double>[o.LookupCallers];
        await Task.WhenAll(Enumerable.Range(0, o.LookupCallers).Select(async caller =>
        {
            var mine = latencies[caller] = new List<double>(100_000);
            for (long k = 0; ; k++)
            {
                long due = start + (long)((k + (double)caller / o.LookupCallers) / perCaller * Stopwatch.Frequency);
                if (due >= end)
                    break;
                long now = Stopwatch.GetTimestamp(), from = due;
                if (due > now)
                {
                    // Idle until due: a timer that wakes late is the client's slack, not the service's latency.
                    await Task.Delay(TimeSpan.FromSeconds((double)(due - now) / Stopwatch.Frequency), ct).ConfigureAwait(false);
                    from = Stopwatch.GetTimestamp();
                }
                var r = await client.LookupAsync(chain, new CallOptions(CancellationToken: ct)).ConfigureAwait(false);
                mine.Add((Stopwatch.GetTimestamp() - from) * 1e6 / Stopwatch.Frequency);
                if (r.MatchedBlocks != expected)
                    throw new InvalidOperationException($"Lookup matched {r.MatchedBlocks} blocks, expected {expected}");
            }
        }));
        double seconds = (double)(Math.Max(end, Stopwatch.GetTimestamp()) - start) / Stopwatch.Frequency;
        double[] all = latencies.SelectMany(l => l).Order().ToArray();
        return (all.Length / seconds, Spread.Percentile(all, 50), Spread.Percentile(all, 99));
    }

    /// <summary>
    /// The node-local path: Reserve shared-memory slots, then Put from them (the engine writes each block into its slot
    /// first: that copy is counted) and Get into them (the bytes land in the slots; the engine reads them in place).
    /// </summary>
    private static async Task<(List<double> Put, List<double> Get)> SlotsAsync(FabricClient client, RpcBenchOptions o, byte[] data,
        byte[][] hashes, byte[] packedAll, int calls, Action<string> progress, CancellationToken ct)
    {
        var reservation = await client.ReserveAsync((uint)o.BlocksPerCall, TimeSpan.FromMinutes(10), new CallOptions(CancellationToken: ct));
        var maps = new Dictionary<string, KvFabric.Memory.MappedMemory>(StringComparer.Ordinal);
        try
        {
            var slots = reservation.Slots.Select(s =>
            {
                if (!maps.TryGetValue(s.Path, out var map))
                    maps[s.Path] = map = KvFabric.Memory.SharedMemorySegment.Open(s.Path, new FileInfo(s.Path).Length);
                return (Address: map.Address + (nint)s.Offset, Length: (int)s.Length);
            }).ToArray();
            var put = new List<double>();
            var get = new List<double>();
            for (int run = 0, warm = Environment.TickCount; run <= o.Runs; run += run > 0 || Environment.TickCount - warm >= o.WarmUp.TotalMilliseconds ? 1 : 0)
            {
                progress($"put via shared-memory slots, run {run}/{o.Runs}");
                await client.DeleteAsync(packedAll, new CallOptions(CancellationToken: ct));
                long start = Stopwatch.GetTimestamp();
                for (int c = 0; c < calls; c++)
                {
                    var blocks = new SlotBlockToPut[o.BlocksPerCall];
                    for (int k = 0; k < o.BlocksPerCall; k++)
                    {
                        int i = c * o.BlocksPerCall + k;
                        data.AsSpan(i * o.BlockBytes, o.BlockBytes).CopyTo(SlotSpan(slots[k]));
                        blocks[k] = new SlotBlockToPut(hashes[i], i == 0 ? ReadOnlyMemory<byte>.Empty : hashes[i - 1], (uint)i, (uint)k, (ulong)o.BlockBytes);
                    }

                    await client.PutFromSlotsAsync(reservation.ReservationId, blocks, new CallOptions(CancellationToken: ct));
                }

                double s = Stopwatch.GetElapsedTime(start).TotalSeconds;
                if (run > 0)
                    put.Add(data.Length / s / 1e9);
            }

            for (int run = 0, warm = Environment.TickCount; run <= o.Runs; run += run > 0 || Environment.TickCount - warm >= o.WarmUp.TotalMilliseconds ? 1 : 0)
            {
                progress($"get into shared-memory slots, run {run}/{o.Runs}");
                long start = Stopwatch.GetTimestamp();
                for (int c = 0; c < calls; c++)
                {
                    ReadOnlyMemory<byte> chain = packedAll.AsMemory(c * o.BlocksPerCall * HashChain.HashBytes, o.BlocksPerCall * HashChain.HashBytes);
                    await client.GetIntoSlotsAsync(chain, reservation.ReservationId, new CallOptions(CancellationToken: ct));
                    if (run == 1 && c == 0 && !SlotSpan(slots[0]).SequenceEqual(data.AsSpan(0, o.BlockBytes)))
                        throw new InvalidOperationException("Get into a slot returned different bytes than were put: the benchmark would measure a broken path");
                }

                double s = Stopwatch.GetElapsedTime(start).TotalSeconds;
                if (run > 0)
                    get.Add(data.Length / s / 1e9);
            }

            return (put, get);
        }
        finally
        {
            await client.ReleaseAsync(reservation.ReservationId, new CallOptions(CancellationToken: ct));
            foreach (var m in maps.Values)
                m.Dispose();
        }

        static unsafe Span<byte> SlotSpan((nint Address, int Length) slot) => new((void*)slot.Address, slot.Length);
    }
}
