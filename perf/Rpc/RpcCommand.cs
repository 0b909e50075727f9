using System.CommandLine;
using System.Text.Json.Nodes;
using KvFabric.Bench.Reporting;
using KvFabric.Bench.Transfer;
using KvFabric.Transfer;
using Spectre.Console;

namespace KvFabric.Bench.Rpc;

/// <summary>`kvfabric-bench rpc`: the gRPC service against the TCP transfer backend measured in the same run.</summary>
public static class RpcCommand
{
    public static Command Create()
    {
        var blockSize = new Option<string>("--block-size") { Description = "bytes per block", DefaultValueFactory = _ => "2MiB" };
        var blocks = new Option<int>("--blocks") { Description = "blocks put and got per run", DefaultValueFactory = _ => 128 };
        var perCall = new Option<int>("--blocks-per-call") { Description = "blocks per streamed Put/Get call", DefaultValueFactory = _ => 8 };
        var runs = new Option<int>("--runs") { Description = "measured runs (median reported)", DefaultValueFactory = _ => 5 };
        var callers = new Option<int>("--callers") { Description = "concurrent Lookup callers", DefaultValueFactory = _ => 64 };
        var seconds = new Option<double>("--lookup-seconds") { Description = "how long the Lookup load runs", DefaultValueFactory = _ => 3 };
        var rate = new Option<double>("--lookup-rate") { Description = "also run Lookup open loop at this many calls/s in all (0: only the closed loop)" };
        var noReference = new Option<bool>("--no-reference") { Description = "skip the TCP transfer backend reference" };
        var noH2load = new Option<bool>("--no-h2load") { Description = "skip the Lookup phase driven by h2load (nghttp2-client)" };
        var chunk = new Option<string>("--get-chunk") { Description = "largest data chunk per Get response message (0: the server's 1 MiB default)", DefaultValueFactory = _ => "0" };
        var quick = new Option<bool>("--quick") { Description = "CI-sized run: 16 blocks, 2 runs, 1 s of Lookup, 1 s warm-ups" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("rpc", "The gRPC service over loopback: Lookup calls/s and latency with concurrent callers, streamed Put/Get GB/s vs the TCP transfer backend.")
        {
            blockSize, blocks, perCall, runs, callers, seconds, noReference, noH2load, quick, json, chunk, rate,
        };
        cmd.SetAction(async (p, ct) =>
        {
            bool isQuick = p.GetValue(quick);
            var o = new RpcBenchOptions
            {
                BlockBytes = checked((int)Sizes.Parse(p.GetValue(blockSize)!)),
                Blocks = QuickDefaults.Pick(p, blocks, isQuick, 16),
                BlocksPerCall = p.GetValue(perCall),
                Runs = QuickDefaults.Pick(p, runs, isQuick, 2),
                LookupCallers = p.GetValue(callers),
                LookupDuration = TimeSpan.FromSeconds(QuickDefaults.Pick(p, seconds, isQuick, 1.0)),
                LookupRate = p.GetValue(rate),
                H2load = !p.GetValue(noH2load),
                GetChunkBytes = p.GetValue(chunk) is "0" ? 0 : checked((uint)Sizes.Parse(p.GetValue(chunk)!)),
                WarmUp = TimeSpan.FromSeconds(isQuick ? 1 : 5),
            };
            JsonReport.Write(p.GetValue(json), await RunAsync(o, !p.GetValue(noReference), ct));
            return 0;
        });
        return cmd;
    }

    public static async Task<JsonObject> RunAsync(RpcBenchOptions o, bool withReference, CancellationToken ct)
    {
        RpcBenchResult r = null!;
        TransferBenchResult? tcp = null;
        await AnsiConsole.Status().StartAsync("rpc", async ctx =>
        {
            r = await RpcBench.RunAsync(o, s => ctx.Status($"rpc: {s}"), ct);
            if (withReference)
            {
                var t = new TransferBenchOptions { Backend = BackendKind.Tcp, Op = TransferOp.Write, BlockBytes = o.BlockBytes, Blocks = o.Blocks, Batch = o.BlocksPerCall, Runs = o.Runs };
                tcp = await TransferBench.RunAsync(t, s => ctx.Status($"reference: tcp transfer backend: {s}"), ct);
            }
        });

        var report = JsonReport.Header("rpc");
        report["block_bytes"] = o.BlockBytes;
        report["blocks"] = o.Blocks;
        report["blocks_per_call"] = o.BlocksPerCall;
        report["get_chunk_bytes"] = o.GetChunkBytes;
        report["runs"] = o.Runs;
        report["lookup_callers"] = o.LookupCallers;
        report["lookup_chain_blocks"] = o.LookupChain;
        report["lookup_calls"] = r.LookupCalls;
        report["lookup_calls_per_second"] = JsonReport.Round(r.LookupCallsPerSecond);
        report["lookup_p50_us"] = JsonReport.Round(r.LookupP50Us);
        report["lookup_p99_us"] = JsonReport.Round(r.LookupP99Us);
        report["lookup_client_cpu_us_per_call"] = JsonReport.Round(r.LookupClientCpuUsPerCall);
        report["lookup_server_cpu_us_per_call"] = JsonReport.Round(r.LookupServerCpuUsPerCall);
        if (r.OpenLoop is { } open)
        {
            report["lookup_open_loop_rate"] = o.LookupRate;
            report["lookup_open_loop_calls_per_second"] = JsonReport.Round(open.CallsPerSecond);
            report["lookup_open_loop_p50_us"] = JsonReport.Round(open.P50Us);
            report["lookup_open_loop_p99_us"] = JsonReport.Round(open.P99Us);
        }
        if (r.H2load is { } h2)
        {
            report["lookup_h2load_calls_per_second"] = JsonReport.Round(h2.Lookup.CallsPerSecond);
            report["lookup_h2load_p50_us"] = JsonReport.Round(h2.Lookup.P50Us);
            report["lookup_h2load_p99_us"] = JsonReport.Round(h2.Lookup.P99Us);
            report["lookup_h2load_calls"] = h2.Lookup.Calls;
            report["lookup_h2load_server_cpu_us_per_call"] = JsonReport.Round(h2.ServerCpuUsPerCall);
        }
        else if (r.H2loadNote is { } note)
        {
            report["h2load_note"] = note;
        }
        report["get_client_cpu_seconds_per_gb"] = JsonReport.Round(r.GetClientCpuSecondsPerGb);
        report["get_server_cpu_seconds_per_gb"] = JsonReport.Round(r.GetServerCpuSecondsPerGb);
        report["put_client_cpu_seconds_per_gb"] = JsonReport.Round(r.PutClientCpuSecondsPerGb);
        report["put_server_cpu_seconds_per_gb"] = JsonReport.Round(r.PutServerCpuSecondsPerGb);
        report["put_gbps"] = JsonReport.Round(r.PutGbps.Median);
        report["put_gbps_spread"] = JsonReport.Of(r.PutGbps);
        report["get_gbps"] = JsonReport.Round(r.GetGbps.Median);
        report["put_slots_gbps"] = JsonReport.Round(r.PutSlotsGbps.Median);
        report["get_slots_gbps"] = JsonReport.Round(r.GetSlotsGbps.Median);
        report["get_gbps_spread"] = JsonReport.Of(r.GetGbps);
        var table = new Table().AddColumns("figure", "value");
        table.AddRow($"Lookup ({o.LookupCallers} callers, {o.LookupChain}-block chain)", $"{r.LookupCallsPerSecond:F0} calls/s, p50 {r.LookupP50Us:F0} us, p99 {r.LookupP99Us:F0} us");
        table.AddRow("Lookup CPU per call (client / server)", $"{r.LookupClientCpuUsPerCall:F0} / {r.LookupServerCpuUsPerCall:F0} us");
        if (r.OpenLoop is { } ol)
            table.AddRow($"Lookup open loop ({o.LookupCallers} callers, {o.LookupRate:F0} calls/s asked)", $"{ol.CallsPerSecond:F0} calls/s, p50 {ol.P50Us:F0} us, p99 {ol.P99Us:F0} us (from the scheduled time)");
        if (r.H2load is { } h)
            table.AddRow($"Lookup from h2load ({o.LookupCallers} streams, server CPU {h.ServerCpuUsPerCall:F0} us per call)",
                $"{h.Lookup.CallsPerSecond:F0} calls/s, p50 {h.Lookup.P50Us:F0} us, p99 {h.Lookup.P99Us:F0} us");
        table.AddRow("Get CPU s per GB (client / server)", $"{r.GetClientCpuSecondsPerGb:F3} / {r.GetServerCpuSecondsPerGb:F3}");
        table.AddRow("Put CPU s per GB (client / server)", $"{r.PutClientCpuSecondsPerGb:F3} / {r.PutServerCpuSecondsPerGb:F3}");
        table.AddRow($"Put streamed ({Sizes.Format(o.BlockBytes)} blocks)", $"{r.PutGbps.Median:F2} GB/s (min {r.PutGbps.Min:F2}, max {r.PutGbps.Max:F2})");
        table.AddRow($"Get streamed ({Sizes.Format(o.BlockBytes)} blocks)", $"{r.GetGbps.Median:F2} GB/s (min {r.GetGbps.Min:F2}, max {r.GetGbps.Max:F2})");
        table.AddRow("Put via shared-memory slots (node-local)", $"{r.PutSlotsGbps.Median:F2} GB/s (min {r.PutSlotsGbps.Min:F2}, max {r.PutSlotsGbps.Max:F2})");
        table.AddRow("Get into shared-memory slots (node-local)", $"{r.GetSlotsGbps.Median:F2} GB/s (min {r.GetSlotsGbps.Min:F2}, max {r.GetSlotsGbps.Max:F2})");
        if (tcp is not null)
        {
            report["tcp_gbps"] = JsonReport.Round(tcp.Gbps.Median);
            report["tcp_gbps_spread"] = JsonReport.Of(tcp.Gbps);
            report["get_vs_tcp"] = JsonReport.Round(r.GetGbps.Median / tcp.Gbps.Median);
            report["put_vs_tcp"] = JsonReport.Round(r.PutGbps.Median / tcp.Gbps.Median);
            table.AddRow("reference: TCP transfer backend WRITE", $"{tcp.Gbps.Median:F2} GB/s");
            table.AddRow("Get / TCP backend", $"{r.GetGbps.Median / tcp.Gbps.Median:P0}");
            table.AddRow("Put / TCP backend", $"{r.PutGbps.Median / tcp.Gbps.Median:P0}");
        }
        else
        {
            report["reference_note"] = "TCP transfer backend reference skipped (--no-reference)";
        }

        report["targets"] = new JsonObject
        {
            ["lookup_p99_under_1ms"] = r.LookupP99Us < 1000,
            ["lookup_h2load_p99_under_1ms"] = r.H2load is { } h2Target ? h2Target.Lookup.P99Us < 1000 : null,
            ["get_at_least_60pct_of_tcp"] = tcp is null ? null : r.GetGbps.Median >= 0.6 * tcp.Gbps.Median,
        };
        AnsiConsole.Write(table);
        return report;
    }
}
