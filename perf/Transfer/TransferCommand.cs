using System.CommandLine;
using System.Text.Json.Nodes;
using KvFabric.Bench.References;
using KvFabric.Bench.Reporting;
using KvFabric.Transfer;
using Spectre.Console;

namespace KvFabric.Bench.Transfer;

/// <summary>`kvfabric-bench transfer`: one backend and op, with its physical reference measured in the same run.</summary>
public static class TransferCommand
{
    public static Command Create()
    {
        var backend = new Option<string>("--backend") { Description = "tcp, shm or ucx", DefaultValueFactory = _ => "tcp" };
        var ucxTls = new Option<string>("--ucx-tls") { Description = "UCX_TLS for --backend ucx (tcp, posix,self, sm,self, ...)", DefaultValueFactory = _ => "tcp" };
        var ucxAlloc = new Option<bool>("--ucx-alloc") { Description = "with --backend ucx: the peer's region is allocated by UCX (ucp_mem_map ALLOCATE), so posix/sysv transports map it directly" };
        var op = new Option<string>("--op") { Description = "write or read", DefaultValueFactory = _ => "write" };
        var blockSize = new Option<string>("--block-size") { Description = "bytes per block (64KiB..16MiB)", DefaultValueFactory = _ => "2MiB" };
        var blocks = new Option<int>("--blocks") { Description = "blocks moved per run", DefaultValueFactory = _ => 256 };
        var batch = new Option<int>("--batch") { Description = "blocks per transfer request", DefaultValueFactory = _ => 32 };
        var streams = new Option<int>("--streams") { Description = "TCP connections / copy threads per request", DefaultValueFactory = _ => 1 };
        var runs = new Option<int>("--runs") { Description = "measured runs (the median is reported)", DefaultValueFactory = _ => 5 };
        var repeat = new Option<int>("--repeat") { Description = "times each block is moved per run (with few blocks: a cache-resident working set, as iperf3 has)", DefaultValueFactory = _ => 1 };
        var inflight = new Option<int>("--inflight") { Description = "requests posted concurrently", DefaultValueFactory = _ => 1 };
        var checksum = new Option<string>("--checksum") { Description = "none, xxh3 or crc32c", DefaultValueFactory = _ => "none" };
        var noReference = new Option<bool>("--no-reference") { Description = "skip the reference measurement (iperf3 or memcpy)" };
        var install = new Option<bool>("--install-references") { Description = "apt-get install the reference tools first (root)" };
        var quick = new Option<bool>("--quick") { Description = "CI-sized run: 64 blocks, 1 s iperf3 runs" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("transfer", "Transfer throughput between two processes on loopback, against iperf3 (tcp) or memcpy (shm).")
        {
            backend, op, blockSize, blocks, batch, streams, runs, repeat, inflight, checksum, noReference, install, quick, json, ucxTls, ucxAlloc,
        };
        cmd.SetAction(async (p, ct) =>
        {
            bool isQuick = p.GetValue(quick);
            var o = new TransferBenchOptions
            {
                Backend = p.GetValue(backend) switch
                {
                    "tcp" => BackendKind.Tcp,
                    "shm" => BackendKind.SharedMemory,
                    "ucx" => BackendKind.Ucx,
                    var b => throw new ArgumentException($"--backend {b}: use tcp, shm or ucx"),
                },
                UcxTls = p.GetValue(ucxTls)!,
                UcxAllocate = p.GetValue(ucxAlloc),
                Op = p.GetValue(op) switch
                {
                    "write" => TransferOp.Write,
                    "read" => TransferOp.Read,
                    var x => throw new ArgumentException($"--op {x}: use write or read"),
                },
                BlockBytes = Sizes.Parse(p.GetValue(blockSize)!),
                Blocks = QuickDefaults.Pick(p, blocks, isQuick, 64),
                Batch = p.GetValue(batch),
                Streams = p.GetValue(streams),
                Runs = p.GetValue(runs),
                Repeat = p.GetValue(repeat),
                Inflight = p.GetValue(inflight),
                Checksum = p.GetValue(checksum) switch
                {
                    "none" => ChecksumKind.None,
                    "xxh3" => ChecksumKind.XxHash3,
                    "crc32c" => ChecksumKind.Crc32C,
                    var c => throw new ArgumentException($"--checksum {c}: use none, xxh3 or crc32c"),
                },
            };
            if (p.GetValue(install))
                await ReferenceTools.InstallAsync(ct);
            var report = await RunAsync(o, !p.GetValue(noReference), isQuick ? 1 : 2, ct);
            JsonReport.Write(p.GetValue(json), report);
            return 0;
        });
        return cmd;
    }

    public static async Task<JsonObject> RunAsync(TransferBenchOptions o, bool withReference, double iperfSeconds, CancellationToken ct)
    {
        TransferBenchResult result = null!;
        var references = new List<(string Tool, Spread Gbps, string About)>();
        string? note = null;
        string backendName = o.Backend switch { BackendKind.Tcp => "tcp", BackendKind.Ucx => "ucx", _ => "shm" };
        string label = (o.Backend == BackendKind.Ucx ? $"ucx({o.UcxTls}{(o.UcxAllocate ? ", ucx-alloc" : "")}) " : $"{backendName} ") + $"{o.Op.ToString().ToLowerInvariant()} {Sizes.Format(o.BlockBytes)} x {o.Blocks}" + (o.Repeat > 1 ? $" x{o.Repeat}" : "");
        int refRuns = Math.Max(5, o.Runs);
        await AnsiConsole.Status().StartAsync(label, async ctx =>
        {
            result = await TransferBench.RunAsync(o, s => ctx.Status($"{label}: {s}"), ct);
            if (!withReference)
                return;
            if (o.Backend == BackendKind.Ucx)
            {
                // Over shared memory the issue's reference is memcpy; over the network ucx_perftest ucp_put_bw. Both are measured.
                bool network = o.UcxTls.Contains("tcp", StringComparison.Ordinal) || o.UcxTls.Contains("rc", StringComparison.Ordinal) || o.UcxTls.Contains("ud", StringComparison.Ordinal);
                (string, Spread, string)? perftest = null;
                if (UcxPerftestReference.IsInstalled())
                {
                    int iterations = (int)Math.Clamp((long)o.Blocks * o.Repeat, 64, 4096);
                    ctx.Status("reference: ucx_perftest ucp_put_bw");
                    string[] env = UcxPerftestReference.Environment(o.UcxTls);
                    perftest = ("ucx_perftest", Spread.Of(await UcxPerftestReference.MeasureAsync(env, o.BlockBytes, iterations, Math.Max(8, iterations / 10), refRuns, ct)),
                        $"{string.Join(' ', env)} ucx_perftest -t ucp_put_bw -s {o.BlockBytes} -n {iterations} (server and client on loopback)");
                }
                else
                {
                    note = ReferenceTools.Missing("ucx_perftest", "ucx-utils");
                }
                if (network && perftest is { } p1)
                    references.Add(p1);
                ctx.Status("reference: single-thread memcpy of the same blocks");
                references.Add(("memcpy_private", Spread.Of(MemcpyReference.Measure(o.BlockBytes, o.Blocks, refRuns, 1, sharedDestination: false)),
                    "one thread, private to private memory: the memory kinds of the UCX transfer"));
                if (!network && perftest is { } p2)
                    references.Add(p2);
                return;
            }
            if (o.Backend == BackendKind.SharedMemory)
            {
                ctx.Status("reference: single-thread memcpy of the same blocks");
                references.Add(("memcpy", Spread.Of(MemcpyReference.Measure(o.BlockBytes, o.Blocks, refRuns, 1, sharedDestination: true)),
                    "one thread, private memory to a /dev/shm segment: the same memory kinds as the transfer"));
                references.Add(("memcpy_private", Spread.Of(MemcpyReference.Measure(o.BlockBytes, o.Blocks, refRuns, 1, sharedDestination: false)),
                    "one thread, private to private memory (may use transparent huge pages, which /dev/shm does not)"));
                return;
            }
            if (Iperf3Reference.IsInstalled())
            {
                ctx.Status($"reference: iperf3 -l {Sizes.Format(Iperf3Reference.WriteBytes(o.BlockBytes))} -P {o.Streams}");
                references.Add(("iperf3", Spread.Of(await Iperf3Reference.MeasureAsync(o.BlockBytes, o.Streams, refRuns, iperfSeconds, ct)),
                    $"iperf3 -l {Sizes.Format(Iperf3Reference.WriteBytes(o.BlockBytes))} -P {o.Streams}: one cache-resident buffer re-sent"));
            }
            else
            {
                note = ReferenceTools.Missing("iperf3", "iperf3");
            }
            ctx.Status("reference: raw blocking socket loop over the same blocks");
            references.Add(("raw_socket", Spread.Of(await RawSocketReference.MeasureAsync(o.BlockBytes, o.Blocks, refRuns, 1, ct)),
                "plain blocking send/recv of the same distinct blocks, one stream, no protocol"));
        });

        var report = JsonReport.Header("transfer");
        report["backend"] = backendName;
        report["op"] = o.Op.ToString().ToLowerInvariant();
        report["block_bytes"] = o.BlockBytes;
        report["blocks"] = o.Blocks;
        report["batch"] = o.Batch;
        report["streams"] = o.Streams;
        report["repeat"] = o.Repeat;
        report["inflight"] = o.Inflight;
        report["checksum"] = o.Checksum.ToString();
        report["runs"] = o.Runs;
        report["seconds"] = JsonReport.Round(result.MedianRunSeconds);
        report["gbps"] = JsonReport.Round(result.Gbps.Median);
        report["gbps_spread"] = JsonReport.Of(result.Gbps);
        report["blocks_per_second"] = JsonReport.Round(result.BlocksPerSecond);
        report["batch_latency_p50_us"] = JsonReport.Round(result.BatchLatencyP50Us);
        report["batch_latency_p99_us"] = JsonReport.Round(result.BatchLatencyP99Us);
        report["cpu_seconds_per_gb"] = JsonReport.Round(result.InitiatorCpuSecondsPerGb);
        report["peer_cpu_seconds_per_gb"] = JsonReport.Round(result.PeerCpuSecondsPerGb);
        if (o.Backend == BackendKind.Ucx)
        {
            report["ucx_tls"] = o.UcxTls;
            report["ucx_alloc"] = o.UcxAllocate;
            report["ucx_transports"] = new JsonArray(result.UcxTransports.Select(t => (JsonNode)JsonValue.Create(t)).ToArray());
        }
        var table = new Table().AddColumns("figure", "value");
        table.AddRow("KvFabric", $"{result.Gbps.Median:F2} GB/s (min {result.Gbps.Min:F2}, max {result.Gbps.Max:F2}, {result.Gbps.Runs} runs)");
        table.AddRow("blocks/s", $"{result.BlocksPerSecond:F0}");
        table.AddRow("request latency p50 / p99", $"{result.BatchLatencyP50Us / 1000:F2} / {result.BatchLatencyP99Us / 1000:F2} ms");
        table.AddRow("CPU s per GB (initiator / peer)", $"{result.InitiatorCpuSecondsPerGb:F3} / {result.PeerCpuSecondsPerGb:F3}");
        if (references.Count > 0)
        {
            var refs = new JsonObject();
            var ratios = new JsonObject();
            foreach (var (tool, spread, about) in references)
            {
                double ratio = result.Gbps.Median / spread.Median;
                refs[tool] = new JsonObject { ["gbps"] = JsonReport.Round(spread.Median), ["gbps_spread"] = JsonReport.Of(spread), ["what"] = about };
                ratios[$"{backendName}_vs_{tool}"] = JsonReport.Round(ratio);
                table.AddRow(tool, $"{spread.Median:F2} GB/s (min {spread.Min:F2}, max {spread.Max:F2}, {spread.Runs} runs)");
                table.AddRow($"ratio KvFabric / {tool}", $"{ratio:P0}");
            }
            // The issue's reference for each backend leads: iperf3 for TCP, memcpy for shared memory.
            var (primary, primarySpread, _) = references[0];
            report["reference"] = new JsonObject { ["tool"] = primary, ["gbps"] = JsonReport.Round(primarySpread.Median) };
            report["ratio"] = JsonReport.Round(result.Gbps.Median / primarySpread.Median);
            report["references"] = refs;
            report["ratios"] = ratios;
        }
        if (note is not null)
        {
            report["reference_note"] = note;
            table.AddRow("note", note);
        }
        AnsiConsole.Write(new Rule($"transfer: {label}, batch {o.Batch}, streams {o.Streams}, inflight {o.Inflight}"));
        AnsiConsole.Write(table);
        return report;
    }
}
