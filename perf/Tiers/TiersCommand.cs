using System.CommandLine;
using System.Text.Json.Nodes;
using KvFabric.Bench.References;
using KvFabric.Bench.Reporting;
using Spectre.Console;

namespace KvFabric.Bench.Tiers;

/// <summary>`kvfabric-bench tiers`: the SSD tier's sequential and random throughput against fio on the same disk, same run.</summary>
public static class TiersCommand
{
    public static Command Create()
    {
        var dir = new Option<string>("--dir") { Description = "directory on the disk under test (the tier and fio's file go there)", DefaultValueFactory = _ => Path.Combine(Path.GetTempPath(), "kvfabric-bench-tiers") };
        var blockSize = new Option<string>("--block-size") { Description = "bytes per block", DefaultValueFactory = _ => "2MiB" };
        var blocks = new Option<int>("--blocks") { Description = "blocks written and read per run", DefaultValueFactory = _ => 512 };
        var concurrency = new Option<int>("--concurrency") { Description = "operations in flight (fio gets the same iodepth)", DefaultValueFactory = _ => 8 };
        var runs = new Option<int>("--runs") { Description = "measured runs (the median is reported)", DefaultValueFactory = _ => 3 };
        var noReference = new Option<bool>("--no-reference") { Description = "skip fio" };
        var install = new Option<bool>("--install-references") { Description = "apt-get install the reference tools first (root)" };
        var quick = new Option<bool>("--quick") { Description = "CI-sized run: 32 blocks, 1 run" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("tiers", "SSD tier write/read throughput of large blocks against fio on the same directory.")
        {
            dir, blockSize, blocks, concurrency, runs, noReference, install, quick, json,
        };
        cmd.SetAction(async (p, ct) =>
        {
            bool isQuick = p.GetValue(quick);
            long bs = Sizes.Parse(p.GetValue(blockSize)!);
            if (bs > 256 << 20)
                throw new ArgumentException($"--block-size {Sizes.Format(bs)}: the SSD tier takes blocks of at most 256MiB");
            var o = new SsdBenchOptions
            {
                Directory = Path.GetFullPath(p.GetValue(dir)!),
                BlockBytes = (int)bs,
                Blocks = isQuick && p.GetResult(blocks) is not { Implicit: false } ? 32 : p.GetValue(blocks),
                Concurrency = p.GetValue(concurrency),
                Runs = isQuick && p.GetResult(runs) is not { Implicit: false } ? 1 : p.GetValue(runs),
            };
            if (o.Blocks <= 0 || o.Concurrency <= 0 || o.Runs <= 0)
                throw new ArgumentException("--blocks, --concurrency and --runs must be positive");
            if (p.GetValue(install))
                await ReferenceTools.InstallAsync(ct);
            Directory.CreateDirectory(o.Directory);
            var report = await RunAsync(o, !p.GetValue(noReference), ct);
            JsonReport.Write(p.GetValue(json), report);
            return 0;
        });
        return cmd;
    }

    public static async Task<JsonObject> RunAsync(SsdBenchOptions o, bool withReference, CancellationToken ct)
    {
        SsdBenchResult r = null!;
        var fio = new Dictionary<string, Spread>();
        string? note = null;
        long total = (long)o.BlockBytes * o.Blocks;
        string label = $"ssd {Sizes.Format(o.BlockBytes)} x {o.Blocks}, {o.Concurrency} in flight";
        await AnsiConsole.Status().StartAsync(label, async ctx =>
        {
            r = await SsdBench.RunAsync(o, s => ctx.Status($"{label}: {s}"), ct);
            if (!withReference)
                return;
            if (!FioReference.IsInstalled())
            {
                note = ReferenceTools.Missing("fio", "fio");
                return;
            }
            string file = Path.Combine(o.Directory, "fio-reference.dat");
            try
            {
                // write_fresh: the file is deleted before each run, so fio writes into newly allocated space, as the tier
                // does into its new data segments (fio preallocates its file with fallocate, as the tier does); the other
                // write jobs overwrite the file fio wrote before, whose space the disk has already allocated.
                var jobs = new (string Name, string Rw, bool Sync, bool Fresh)[]
                {
                    ("write_fresh", "write", true, true), ("write", "write", true, false), ("write_nosync", "write", false, false),
                    ("read", "read", false, false), ("randread", "randread", false, false),
                };
                foreach (var (name, rw, sync, fresh) in jobs)
                {
                    var values = new List<double>();
                    for (int run = 0; run < o.Runs; run++)
                    {
                        if (fresh)
                            File.Delete(file);
                        ctx.Status($"reference: fio --rw={rw} --bs={o.BlockBytes} --direct=1{(sync ? " --sync=sync" : "")}{(fresh ? " (new file)" : "")} (run {run + 1}/{o.Runs})");
                        values.Add(await FioReference.MeasureAsync(file, rw, o.BlockBytes, total, o.Concurrency, sync, ct));
                    }
                    fio[name] = Spread.Of(values);
                }
            }
            finally
            {
                File.Delete(file);
            }
        });

        var report = JsonReport.Header("tiers");
        report["tier"] = "ssd";
        report["directory"] = o.Directory;
        report["block_bytes"] = o.BlockBytes;
        report["blocks"] = o.Blocks;
        report["concurrency"] = o.Concurrency;
        report["runs"] = o.Runs;
        report["ssd_write_gbps"] = JsonReport.Round(r.WriteGbps.Median);
        report["ssd_write_gbps_spread"] = JsonReport.Of(r.WriteGbps);
        report["ssd_write_first_run_gbps"] = JsonReport.Round(r.FirstWriteGbps);
        if (r.SteadyWriteGbps is { } steady) // from the second run on
        {
            report["ssd_write_steady_gbps"] = JsonReport.Round(steady.Median);
            report["ssd_write_steady_gbps_spread"] = JsonReport.Of(steady);
        }
        report["ssd_write_zstd_on_gbps"] = JsonReport.Round(r.WriteCompressedGbps.Median);
        report["ssd_write_zstd_on_gbps_spread"] = JsonReport.Of(r.WriteCompressedGbps);
        report["ssd_read_gbps"] = JsonReport.Round(r.ReadGbps.Median);
        report["ssd_read_gbps_spread"] = JsonReport.Of(r.ReadGbps);
        report["ssd_randread_gbps"] = JsonReport.Round(r.RandomReadGbps.Median);
        report["ssd_randread_gbps_spread"] = JsonReport.Of(r.RandomReadGbps);
        report["ssd_reopen_seconds"] = JsonReport.Round(r.OpenSeconds.Median);
        report["ssd_write_cpu_seconds_per_gb"] = JsonReport.Round(r.WriteCpuSecondsPerGb.Median);
        report["ssd_read_cpu_seconds_per_gb"] = JsonReport.Round(r.ReadCpuSecondsPerGb.Median);
        var table = new Table().AddColumns("figure", "value");
        table.AddRow("SSD tier write (durable)", Row(r.WriteGbps));
        table.AddRow("  first run (new space)", $"{r.FirstWriteGbps:F2} GB/s");
        if (r.SteadyWriteGbps is { } later)
            table.AddRow("  later runs (reused segments)", Row(later));
        table.AddRow("SSD tier write, zstd on (noise)", Row(r.WriteCompressedGbps));
        table.AddRow("SSD tier sequential read", Row(r.ReadGbps));
        table.AddRow("SSD tier random read", Row(r.RandomReadGbps));
        table.AddRow("CPU s per GB (write / read)", $"{r.WriteCpuSecondsPerGb.Median:F3} / {r.ReadCpuSecondsPerGb.Median:F3}");
        table.AddRow("reopen (recovery scan)", $"{r.OpenSeconds.Median:F2} s for {Sizes.Format(total)}");
        if (fio.Count > 0)
        {
            var refs = new JsonObject();
            foreach (var (name, spread) in fio)
            {
                refs[name] = new JsonObject { ["gbps"] = JsonReport.Round(spread.Median), ["gbps_spread"] = JsonReport.Of(spread) };
                table.AddRow($"fio {name}", Row(spread));
            }
            refs["what"] = $"fio --bs={o.BlockBytes} --size={total} --direct=1 --ioengine=libaio --iodepth={o.Concurrency}; write and write_fresh add --sync=sync "
                + "(O_SYNC: durable on completion, as the tier's writes are); write_fresh deletes the file before each run (new space, as the tier's new data segments), "
                + "write overwrites the file of the run before";
            report["fio"] = refs;
            var ratios = new JsonObject
            {
                ["ssd_write_vs_fio"] = JsonReport.Round(r.WriteGbps.Median / fio["write"].Median),
                ["ssd_write_first_vs_fio_fresh"] = JsonReport.Round(r.FirstWriteGbps / fio["write_fresh"].Median),
                ["ssd_write_vs_fio_nosync"] = JsonReport.Round(r.WriteGbps.Median / fio["write_nosync"].Median),
                ["ssd_read_vs_fio"] = JsonReport.Round(r.ReadGbps.Median / fio["read"].Median),
                ["ssd_randread_vs_fio"] = JsonReport.Round(r.RandomReadGbps.Median / fio["randread"].Median),
                ["zstd_on_vs_off_write"] = JsonReport.Round(r.WriteCompressedGbps.Median / r.WriteGbps.Median),
            };
            if (r.SteadyWriteGbps is { } steadyRuns)
                ratios["ssd_write_steady_vs_fio"] = JsonReport.Round(steadyRuns.Median / fio["write"].Median);
            report["ratios"] = ratios;
            foreach (var (name, value) in ratios)
                table.AddRow(name, $"{value!.GetValue<double>():P0}");
        }
        if (note is not null)
        {
            report["reference_note"] = note;
            table.AddRow("note", note);
        }
        AnsiConsole.Write(new Rule($"tiers: {label}"));
        AnsiConsole.Write(table);
        return report;
    }

    private static string Row(Spread s) => $"{s.Median:F2} GB/s (min {s.Min:F2}, max {s.Max:F2}, {s.Runs} runs)";
}
