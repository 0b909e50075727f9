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
        var backend = new Option<string>("--backend") { Description = "tcp or shm", DefaultValueFactory = _ => "tcp" };
        var op = new Option<string>("--op") { Description = "write or read", DefaultValueFactory = _ => "write" };
        var blockSize = new Option<string>("--block-size") { Description = "bytes per block (64KiB..16MiB)", DefaultValueFactory = _ => "2MiB" };
        var blocks = new Option<int>("--blocks") { Description = "blocks moved per run", DefaultValueFactory = _ => 256 };
        var batch = new Option<int>("--batch") { Description = "blocks per transfer request", DefaultValueFactory = _ => 32 };
        var streams = new Option<int>("--streams") { Description = "TCP connections / copy threads per request", DefaultValueFactory = _ => 1 };
        var runs = new Option<int>("--runs") { Description = "measured runs (the median is reported)", DefaultValueFactory = _ => 5 };
        var checksum = new Option<string>("--checksum") { Description = "none, xxh3 or crc32c", DefaultValueFactory = _ => "none" };
        var noReference = new Option<bool>("--no-reference") { Description = "skip the reference measurement (iperf3 or memcpy)" };
        var install = new Option<bool>("--install-references") { Description = "apt-get install the reference tools first (root)" };
        var quick = new Option<bool>("--quick") { Description = "CI-sized run: 64 blocks, 1 s iperf3 runs" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("transfer", "Transfer throughput between two processes on loopback, against iperf3 (tcp) or memcpy (shm).")
        {
            backend, op, blockSize, blocks, batch, streams, runs, checksum, noReference, install, quick, json,
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
                    var b => throw new ArgumentException($"--backend {b}: use tcp or shm"),
                },
                Op = p.GetValue(op) switch
                {
                    "write" => TransferOp.Write,
                    "read" => TransferOp.Read,
                    var x => throw new ArgumentException($"--op {x}: use write or read"),
                },
                BlockBytes = Sizes.Parse(p.GetValue(blockSize)!),
                Blocks = isQuick && p.GetResult(blocks) is null ? 64 : p.GetValue(blocks),
                Batch = p.GetValue(batch),
                Streams = p.GetValue(streams),
                Runs = p.GetValue(runs),
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
        IReadOnlyList<double>? reference = null;
        string? refTool = null, note = null;
        string label = $"{(o.Backend == BackendKind.Tcp ? "tcp" : "shm")} {o.Op.ToString().ToLowerInvariant()} {Sizes.Format(o.BlockBytes)} x {o.Blocks}";
        await AnsiConsole.Status().StartAsync(label, async ctx =>
        {
            result = await TransferBench.RunAsync(o, s => ctx.Status($"{label}: {s}"), ct);
            if (!withReference)
                return;
            if (o.Backend == BackendKind.SharedMemory)
            {
                refTool = "memcpy";
                ctx.Status("reference: single-thread memcpy of the same blocks");
                reference = MemcpyReference.Measure(o.BlockBytes, o.Blocks, Math.Max(5, o.Runs), 1);
            }
            else if (Iperf3Reference.IsInstalled())
            {
                refTool = "iperf3";
                ctx.Status($"reference: iperf3 -l {Sizes.Format(Iperf3Reference.WriteBytes(o.BlockBytes))} -P {o.Streams}");
                reference = await Iperf3Reference.MeasureAsync(o.BlockBytes, o.Streams, Math.Max(5, o.Runs), iperfSeconds, ct);
            }
            else
            {
                note = ReferenceTools.Missing("iperf3", "iperf3");
            }
        });

        var report = JsonReport.Header("transfer");
        report["backend"] = o.Backend == BackendKind.Tcp ? "tcp" : "shm";
        report["op"] = o.Op.ToString().ToLowerInvariant();
        report["block_bytes"] = o.BlockBytes;
        report["blocks"] = o.Blocks;
        report["batch"] = o.Batch;
        report["streams"] = o.Streams;
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
        var table = new Table().AddColumns("figure", "value");
        table.AddRow("KvFabric", $"{result.Gbps.Median:F2} GB/s (min {result.Gbps.Min:F2}, max {result.Gbps.Max:F2}, {result.Gbps.Runs} runs)");
        table.AddRow("blocks/s", $"{result.BlocksPerSecond:F0}");
        table.AddRow("batch latency p50 / p99", $"{result.BatchLatencyP50Us / 1000:F2} / {result.BatchLatencyP99Us / 1000:F2} ms");
        table.AddRow("CPU s per GB (initiator / peer)", $"{result.InitiatorCpuSecondsPerGb:F3} / {result.PeerCpuSecondsPerGb:F3}");
        if (reference is not null)
        {
            var spread = Spread.Of(reference);
            double ratio = result.Gbps.Median / spread.Median;
            report["reference"] = new JsonObject
            {
                ["tool"] = refTool,
                ["gbps"] = JsonReport.Round(spread.Median),
                ["gbps_spread"] = JsonReport.Of(spread),
                ["write_bytes"] = refTool == "iperf3" ? Iperf3Reference.WriteBytes(o.BlockBytes) : o.BlockBytes,
            };
            report["ratio"] = JsonReport.Round(ratio);
            table.AddRow(refTool!, $"{spread.Median:F2} GB/s (min {spread.Min:F2}, max {spread.Max:F2}, {spread.Runs} runs)");
            table.AddRow($"ratio KvFabric / {refTool}", $"{ratio:P0}");
        }
        else if (note is not null)
        {
            report["reference_note"] = note;
            table.AddRow("reference", note);
        }
        AnsiConsole.Write(new Rule($"transfer: {label}, batch {o.Batch}, streams {o.Streams}"));
        AnsiConsole.Write(table);
        return report;
    }
}
