using System.CommandLine;
using System.Text.Json.Nodes;
using KvFabric.Bench.References;
using KvFabric.Bench.Reporting;
using KvFabric.Bench.Tiers;
using KvFabric.Bench.Transfer;
using KvFabric.Transfer;
using Spectre.Console;

namespace KvFabric.Bench.Compare;

/// <summary>
/// `kvfabric-bench compare`: KvFabric and every reference back to back, same block size and concurrency, as ratios. It
/// calls the suites' own measuring code (TransferBench, SsdBench, the reference classes); each figure is the median of
/// at least 5 measured runs after warm-up, with min and max.
/// </summary>
public static class CompareCommand
{
    public const int MinRuns = 5;

    public sealed record Options(long BlockBytes, int Concurrency, int Runs, bool Quick, string Directory);

    public static Command Create()
    {
        var blockSize = new Option<string>("--block-size") { Description = "bytes per block / value / message", DefaultValueFactory = _ => "2MiB" };
        var concurrency = new Option<int>("--concurrency") { Description = "requests in flight: transfer requests, redis clients, SSD operations and fio iodepth", DefaultValueFactory = _ => 4 };
        var runs = new Option<int>("--runs") { Description = $"measured runs per figure, at least {MinRuns} (the median is reported)", DefaultValueFactory = _ => MinRuns };
        var dir = new Option<string>("--dir") { Description = "directory for the SSD tier and fio's file", DefaultValueFactory = _ => Path.Combine(Path.GetTempPath(), "kvfabric-bench-compare") };
        var install = new Option<bool>("--install-references") { Description = "apt-get install the reference tools first (root)" };
        var quick = new Option<bool>("--quick") { Description = "tiny sizes (still at least 5 runs per figure): finishes in a few minutes" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("compare", "KvFabric against iperf3, memcpy, redis, ucx_perftest and fio, back to back, as ratios.")
        {
            blockSize, concurrency, runs, dir, install, quick, json,
        };
        cmd.SetAction(async (p, ct) =>
        {
            var o = new Options(Sizes.Parse(p.GetValue(blockSize)!), p.GetValue(concurrency), p.GetValue(runs), p.GetValue(quick), Path.GetFullPath(p.GetValue(dir)!));
            if (o.Runs < MinRuns)
                throw new ArgumentException($"--runs {o.Runs}: compare reports medians of at least {MinRuns} runs");
            if (o.Concurrency < 1 || o.BlockBytes > 256 << 20)
                throw new ArgumentException("--concurrency must be positive and --block-size at most 256MiB");
            if (p.GetValue(install))
                await ReferenceTools.InstallAsync(ct);
            Directory.CreateDirectory(o.Directory);
            JsonReport.Write(p.GetValue(json), await RunAsync(o, ct));
            return 0;
        });
        return cmd;
    }

    private sealed record Figure(string Name, string What, Spread Gbps);

    public static async Task<JsonObject> RunAsync(Options o, CancellationToken ct)
    {
        int transferBlocks = o.Quick ? 16 : 256;
        int ssdBlocks = o.Quick ? 16 : 256;
        int redisRequests = o.Quick ? 64 : 512;
        int ucxIterations = o.Quick ? 64 : 256;
        double iperfSeconds = o.Quick ? 1 : 2;
        int batch = Math.Max(1, Math.Min(32, transferBlocks / o.Concurrency));
        var figures = new Dictionary<string, Figure>();
        var notes = new List<string>();

        void Add(string name, string what, IReadOnlyList<double> gbps) => figures[name] = new Figure(name, what, Spread.Of(gbps));

        await AnsiConsole.Status().StartAsync("compare", async ctx =>
        {
            var transfer = new TransferBenchOptions { BlockBytes = o.BlockBytes, Blocks = transferBlocks, Batch = batch, Inflight = o.Concurrency, Runs = o.Runs, Warmups = 1 };
            foreach (var (name, backend, op) in new[] { ("kvfabric_tcp_write", BackendKind.Tcp, TransferOp.Write), ("kvfabric_tcp_read", BackendKind.Tcp, TransferOp.Read), ("kvfabric_shm_write", BackendKind.SharedMemory, TransferOp.Write) })
            {
                var r = await TransferBench.RunAsync(transfer with { Backend = backend, Op = op }, s => ctx.Status($"{name}: {s}"), ct);
                figures[name] = new Figure(name, $"transfer --backend {(backend == BackendKind.Tcp ? "tcp" : "shm")} --op {op.ToString().ToLowerInvariant()} --blocks {transferBlocks} --batch {batch} --inflight {o.Concurrency}", r.Gbps);
            }

            ctx.Status("memcpy: one thread, private memory into /dev/shm");
            Add("memcpy", "one thread, the same blocks from private memory into a /dev/shm segment", MemcpyReference.Measure(o.BlockBytes, transferBlocks, o.Runs, 1, sharedDestination: true));

            if (Iperf3Reference.IsInstalled())
            {
                ctx.Status("iperf3 loopback");
                Add("iperf3", $"iperf3 -l {Sizes.Format(Iperf3Reference.WriteBytes(o.BlockBytes))} -P 1 -t {iperfSeconds} -O 1, loopback", await Iperf3Reference.MeasureAsync(o.BlockBytes, 1, o.Runs, iperfSeconds, ct));
            }
            else
            {
                notes.Add(ReferenceTools.Missing("iperf3", "iperf3"));
            }

            if (RedisReference.IsInstalled())
            {
                ctx.Status("redis-benchmark SET/GET");
                var redis = await RedisReference.MeasureAsync(o.BlockBytes, redisRequests, o.Concurrency, o.Runs, 1, ct);
                string what = $"redis-benchmark -t set,get -d {o.BlockBytes} -n {redisRequests} -c {o.Concurrency} -P 1, private redis-server on loopback (no persistence)";
                Add("redis_set", what, redis.Select(f => f.SetGbps).ToArray());
                Add("redis_get", what, redis.Select(f => f.GetGbps).ToArray());
            }
            else
            {
                notes.Add(ReferenceTools.Missing("redis-server / redis-benchmark", "redis-server redis-tools"));
            }

            if (UcxPerftestReference.IsInstalled())
            {
                long segment = Math.Clamp(o.BlockBytes, 64 << 10, 2 << 20);
                // UCX_TLS=tcp with its defaults is the reference asked for; with segments of the block size it is sometimes faster
                // (see UcxPerftestReference.Environment). Both are measured; the ratio uses the faster, the stronger reference.
                foreach (var (name, env) in new[]
                {
                    ("ucx_perftest_tcp", UcxPerftestReference.Environment("tcp")),
                    ("ucx_perftest_tcp_seg", UcxPerftestReference.Environment("tcp", segment)),
                    ("ucx_perftest_posix", UcxPerftestReference.Environment("posix,self")),
                })
                {
                    string settings = string.Join(' ', env);
                    int warmup = Math.Max(1, ucxIterations / 8);
                    ctx.Status($"ucx_perftest ucp_put_bw, {settings}");
                    try
                    {
                        Add(name, $"{settings} ucx_perftest -t ucp_put_bw -s {o.BlockBytes} -n {ucxIterations} -w {warmup}, loopback",
                            await UcxPerftestReference.MeasureAsync(env, o.BlockBytes, ucxIterations, warmup, o.Runs, ct));
                    }
                    catch (Exception e) when (e is InvalidOperationException or TimeoutException or FormatException)
                    {
                        notes.Add($"ucx_perftest with {settings} failed: {e.Message}");
                    }
                }
                var tcpRefs = new[] { "ucx_perftest_tcp", "ucx_perftest_tcp_seg" }.Where(figures.ContainsKey).Select(n => figures[n]).ToArray();
                if (tcpRefs.Length > 0)
                {
                    var best = tcpRefs.MaxBy(f => f.Gbps.Median)!;
                    figures["ucx_perftest_tcp_best"] = best with { Name = "ucx_perftest_tcp_best", What = $"the faster of ucx_perftest_tcp and ucx_perftest_tcp_seg: {best.Name}" };
                }
            }
            else
            {
                notes.Add(ReferenceTools.Missing("ucx_perftest", "ucx-utils"));
            }

            ctx.Status("SSD tier");
            var ssd = new SsdBenchOptions { Directory = o.Directory, BlockBytes = (int)o.BlockBytes, Blocks = ssdBlocks, Concurrency = o.Concurrency, Runs = o.Runs };
            var s = await SsdBench.RunAsync(ssd, t => ctx.Status($"SSD tier: {t}"), ct);
            figures["kvfabric_ssd_write"] = new Figure("kvfabric_ssd_write", $"SSD tier, {ssdBlocks} blocks, {o.Concurrency} in flight, each write acknowledged durable", s.WriteGbps);
            figures["kvfabric_ssd_read"] = new Figure("kvfabric_ssd_read", "SSD tier sequential read after reopening, checksum-verified", s.ReadGbps);
            if (FioReference.IsInstalled())
            {
                string file = Path.Combine(o.Directory, "fio-reference.dat");
                long total = o.BlockBytes * ssdBlocks;
                try
                {
                    foreach (var (name, rw, sync) in new[] { ("fio_write_sync", "write", true), ("fio_read", "read", false) })
                    {
                        var values = new List<double>();
                        for (int run = -1; run < o.Runs; run++)
                        {
                            // Run -1 is the warm-up (untimed): it lays the file out, as the tier's warm-up store does for it.
                            ctx.Status($"fio --rw={rw}{(sync ? " --sync=sync" : "")} {(run < 0 ? "warm-up" : $"run {run + 1}/{o.Runs}")}");
                            double gbps = await FioReference.MeasureAsync(file, rw, o.BlockBytes, total, o.Concurrency, sync, ct);
                            if (run >= 0)
                                values.Add(gbps);
                        }
                        Add(name, $"fio --rw={rw} --bs={o.BlockBytes} --size={total} --direct=1 --ioengine=libaio --iodepth={o.Concurrency}{(sync ? " --sync=sync" : "")}", values);
                    }
                }
                finally
                {
                    File.Delete(file);
                }
            }
            else
            {
                notes.Add(ReferenceTools.Missing("fio", "fio"));
            }
        });

        var ratioDefs = new (string Name, string Ours, string Reference, string What)[]
        {
            ("tcp_vs_iperf3", "kvfabric_tcp_write", "iperf3", "KvFabric TCP backend write / iperf3 loopback"),
            ("shm_vs_memcpy", "kvfabric_shm_write", "memcpy", "shared-memory backend write / single-thread memcpy into /dev/shm"),
            ("tcp_vs_redis_get", "kvfabric_tcp_read", "redis_get", "KvFabric TCP READ / redis GET"),
            ("tcp_vs_redis_set", "kvfabric_tcp_write", "redis_set", "KvFabric TCP WRITE / redis SET"),
            ("tcp_vs_ucx_perftest", "kvfabric_tcp_write", "ucx_perftest_tcp_best", "KvFabric TCP write / ucx_perftest ucp_put_bw over UCX_TLS=tcp, the faster of UCX's default segments and segments of the block size"),
            ("tcp_vs_ucx_perftest_default", "kvfabric_tcp_write", "ucx_perftest_tcp", "KvFabric TCP write / ucx_perftest ucp_put_bw over UCX_TLS=tcp, UCX's defaults"),
            ("tcp_vs_ucx_perftest_seg", "kvfabric_tcp_write", "ucx_perftest_tcp_seg", "KvFabric TCP write / ucx_perftest ucp_put_bw over UCX_TLS=tcp, TCP segments of the block size (max 2 MiB)"),
            ("shm_vs_ucx_perftest_posix", "kvfabric_shm_write", "ucx_perftest_posix", "shared-memory backend write / ucx_perftest ucp_put_bw over UCX_TLS=posix,self"),
            ("ssd_vs_fio", "kvfabric_ssd_write", "fio_write_sync", "SSD tier durable write / fio sequential write with --sync=sync (the same durability)"),
            ("ssd_read_vs_fio", "kvfabric_ssd_read", "fio_read", "SSD tier sequential read / fio sequential read, both O_DIRECT"),
        };

        var report = JsonReport.Header("compare");
        report["block_bytes"] = o.BlockBytes;
        report["concurrency"] = o.Concurrency;
        report["runs"] = o.Runs;
        report["quick"] = o.Quick;
        // The VM is shared: the 1-minute load average at the end says how loaded the run was (2 cores here).
        report["load_average_1min"] = double.Parse(File.ReadAllText("/proc/loadavg").Split(' ')[0], System.Globalization.CultureInfo.InvariantCulture);
        var jsonFigures = new JsonObject();
        foreach (var f in figures.Values)
            jsonFigures[f.Name] = new JsonObject { ["gbps"] = JsonReport.Round(f.Gbps.Median), ["gbps_spread"] = JsonReport.Of(f.Gbps), ["what"] = f.What };
        report["figures"] = jsonFigures;
        var ratios = new JsonObject();
        var ratioWhat = new JsonObject();
        var table = new Table().AddColumns("ratio", "KvFabric GB/s (min-max)", "reference GB/s (min-max)", "ratio");
        foreach (var (name, ours, reference, what) in ratioDefs)
        {
            if (!figures.TryGetValue(ours, out var a) || !figures.TryGetValue(reference, out var b))
                continue;
            double ratio = a.Gbps.Median / b.Gbps.Median;
            ratios[name] = JsonReport.Round(ratio);
            ratioWhat[name] = what;
            table.AddRow(name, $"{ours}: {Cell(a.Gbps)}", $"{reference}: {Cell(b.Gbps)}", $"{ratio:P0}");
        }
        report["ratios"] = ratios;
        report["ratio_definitions"] = ratioWhat;
        if (notes.Count > 0)
            report["reference_notes"] = new JsonArray([.. notes.Select(n => (JsonNode)JsonValue.Create(n))]);
        AnsiConsole.Write(new Rule($"compare: {Sizes.Format(o.BlockBytes)} blocks, concurrency {o.Concurrency}, median of {o.Runs} runs"));
        AnsiConsole.Write(table);
        foreach (string n in notes)
            AnsiConsole.MarkupLine($"[yellow]note:[/] {Markup.Escape(n)}");
        return report;
    }

    private static string Cell(Spread s) => $"{s.Median:F2} ({s.Min:F2}-{s.Max:F2})";
}
