using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using KvFabric.Bench.Reporting;
using KvFabric.Index;

namespace KvFabric.Bench.Index;

// `kvfabric-bench index`: the global radix index on one writer thread. Block events applied per second (to the tree
// directly and through RadixIndex's queue and writer), Match latency of a prompt-length chain fully held by three
// workers (the longest walk), and the index's exact bytes per (block, location).
public static class IndexCommand
{
    private const uint Tenant = 1;

    public static Command Create()
    {
        var blocks = new Option<int>("--blocks") { Description = "distinct blocks in the index", DefaultValueFactory = _ => 1_000_000 };
        var workers = new Option<int>("--workers") { Description = "workers holding them", DefaultValueFactory = _ => 1000 };
        var prompt = new Option<int>("--prompt-blocks") { Description = "blocks per matched prompt chain", DefaultValueFactory = _ => 8192 };
        var runs = new Option<int>("--runs") { Description = "measured build runs (the median is reported)", DefaultValueFactory = _ => 3 };
        var matches = new Option<int>("--matches") { Description = "Match calls timed", DefaultValueFactory = _ => 1000 };
        var quick = new Option<bool>("--quick") { Description = "CI-sized run: 100k blocks, 100 workers, 1024-block prompts, one run" };
        var mixed = new Option<bool>("--mixed-holders") { Description = "prompt chains reported block by block in a rotating holder order: no two consecutive blocks share a location list (Match's worst case)" };
        var scattered = new Option<bool>("--scattered") { Description = "Match against a RadixTree whose entries all came from its free list, out of order: no chain lies in consecutive entries (Match's worst case for memory)" };
        var interleaved = new Option<bool>("--interleaved") { Description = "prompt chains reported one block at a time, interleaved across chains: no chain lies in consecutive arena entries (Match's worst case for memory)" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("index", "Global radix index: block events/s, Match p50/p99 of a prompt chain, bytes per (block, location).")
        {
            blocks, workers, prompt, runs, matches, quick, mixed, interleaved, scattered, json,
        };
        cmd.SetAction(async (p, ct) =>
        {
            bool q = p.GetValue(quick);
            var report = await RunAsync(
                QuickDefaults.Pick(p, blocks, q, 100_000), QuickDefaults.Pick(p, workers, q, 100), QuickDefaults.Pick(p, prompt, q, 1024),
                QuickDefaults.Pick(p, runs, q, 1), QuickDefaults.Pick(p, matches, q, 200), p.GetValue(mixed), ct, p.GetValue(interleaved), p.GetValue(scattered));
            JsonReport.Write(p.GetValue(json), report);
            return 0;
        });
        return cmd;
    }

    // One more build through RadixIndex, as a deployment starts: not pre-sized (the tables grow), with a reader that
    // Matches the first prompt chain about every millisecond while this thread enqueues every event without a pause.
    // What readers wait for while the writer is busy: lock holds, growth, and the writer's fairness to them.
    private static async Task<(double P50, double P99, double Max, int Calls, double EventsPerSecond, long GrowthsAhead)> MatchDuringBuildAsync(
        IndexWorkload workload, CancellationToken ct)
    {
        using var index = new RadixIndex(new RadixIndexOptions { QueueCapacity = 4096 });
        using var stop = new CancellationTokenSource();
        var chain = workload.MatchChains[0];
        var reader = Task.Factory.StartNew(() =>
        {
            var output = new List<MatchResult>();
            var seen = new List<double>();
            while (!stop.IsCancellationRequested)
            {
                long t0 = Stopwatch.GetTimestamp();
                index.Match(Tenant, chain, output);
                seen.Add(Stopwatch.GetElapsedTime(t0).TotalMicroseconds);
                Thread.Sleep(1);
            }
            return seen;
        }, TaskCreationOptions.LongRunning);
        var clock = Stopwatch.StartNew();
        foreach (var e in workload.Events)
            await index.EnqueueAsync(workload.ToIndexEvent(e, Tenant), ct);
        await index.FlushAsync(ct);
        double rate = workload.BlockEvents / clock.Elapsed.TotalSeconds;
        await stop.CancelAsync();
        var latencies = (await reader).ToArray();
        if (latencies.Length == 0)
            return (0, 0, 0, 0, rate, index.GrowthsAhead);
        Array.Sort(latencies);
        return (Spread.Percentile(latencies, 50), Spread.Percentile(latencies, 99), latencies[^1], latencies.Length, rate, index.GrowthsAhead);
    }

    // The machine's 1-minute load average (Linux), recorded because p99 on a shared 2-core VM is mostly preemption.
    private static double LoadAverage()
    {
        try
        {
            string text = File.ReadAllText("/proc/loadavg");
            return double.Parse(text.AsSpan(0, text.IndexOf(' ', StringComparison.Ordinal)), System.Globalization.CultureInfo.InvariantCulture);
        }
        catch (IOException)
        {
            return double.NaN;
        }
    }

    public static async Task<JsonObject> RunAsync(int blocks, int workers, int promptBlocks, int runs, int matches, bool mixedHolders, CancellationToken ct, bool interleaved = false, bool scattered = false)
    {
        if (runs <= 0 || matches <= 0)
            throw new ArgumentException($"--runs {runs} --matches {matches}: both must be positive");
        var setup = Stopwatch.StartNew();
        var workload = new IndexWorkload(blocks, workers, promptBlocks, mixedHolders, interleaved: interleaved);
        Console.WriteLine($"workload: {blocks:N0} blocks, {workers} workers, {workload.Events.Count:N0} events, {workload.BlockEvents:N0} block events, " +
                          $"{workload.MatchChains.Count} match chains of {promptBlocks} blocks (built in {setup.Elapsed.TotalSeconds:F1} s)");

        // Straight into a RadixTree on this thread, table pre-sized for the blocks (no rehash inside the timing).
        var treeRates = new List<double>();
        for (int run = -1; run < runs; run++) // run -1 warms up (JIT, first page faults)
        {
            using var tree = new RadixTree(blocks);
            var clock = Stopwatch.StartNew();
            workload.ApplyTo(tree);
            if (run >= 0)
                treeRates.Add(workload.BlockEvents / clock.Elapsed.TotalSeconds);
        }

        // Through RadixIndex: this thread enqueues (awaiting back-pressure), the writer thread applies; FlushAsync ends it.
        var queueRates = new List<double>();
        RadixIndex? index = null;
        for (int run = 0; run < runs; run++)
        {
            index?.Dispose();
            index = new RadixIndex(new RadixIndexOptions { InitialBlocksPerTenant = blocks, QueueCapacity = 4096 });
            var clock = Stopwatch.StartNew();
            foreach (var e in workload.Events)
                await index.EnqueueAsync(workload.ToIndexEvent(e, Tenant), ct);
            await index.FlushAsync(ct);
            queueRates.Add(workload.BlockEvents / clock.Elapsed.TotalSeconds);
        }
        using var built = index!;
        var counters = built.Counters;
        if (counters.RejectedTotal != 0 || counters.Blocks != blocks)
            throw new InvalidOperationException($"the index rejected {counters.RejectedTotal} events and holds {counters.Blocks} blocks, expected 0 and {blocks}: {built.LastWriterError}");

        // Match: the prompt chains round-robin, so at 10M blocks most walks miss the CPU caches as a cold prompt would.
        // --scattered times a tree built through its free list instead (see IndexWorkload.ApplyScattered).
        using var scatteredTree = scattered ? new RadixTree(blocks) : null;
        if (scatteredTree is not null)
            workload.ApplyScattered(scatteredTree);
        int Walk(KvFabric.Blocks.BlockHash[] chain, List<MatchResult> into) => scatteredTree?.Match(chain, into) ?? built.Match(Tenant, chain, into);
        var output = new List<MatchResult>(workers);
        for (int i = 0; i < Math.Min(matches, 50); i++)
            Walk(workload.MatchChains[i % workload.MatchChains.Count], output); // warm-up
        var latencies = new double[matches];
        var cpu0 = Process.GetCurrentProcess().TotalProcessorTime;
        var wall = Stopwatch.StartNew();
        for (int i = 0; i < matches; i++)
        {
            int c = i % workload.MatchChains.Count;
            long t0 = Stopwatch.GetTimestamp();
            int longest = Walk(workload.MatchChains[c], output);
            latencies[i] = Stopwatch.GetElapsedTime(t0).TotalMicroseconds;
            if (longest != promptBlocks || output.Count != workers || output[2].Matched != promptBlocks || output[3].Matched != workload.SharedBlocks)
                throw new InvalidOperationException($"Match of chain {c} gave longest {longest} over {output.Count} workers; expected {promptBlocks} for 3 workers and {workload.SharedBlocks} for the rest");
        }
        double matchCpuMean = (Process.GetCurrentProcess().TotalProcessorTime - cpu0).TotalMicroseconds / matches;
        double matchWallMean = wall.Elapsed.TotalMicroseconds / matches;
        Array.Sort(latencies);
        // Last, so that nothing it leaves behind (garbage, a writer thread winding down) touches the figures above.
        var during = await MatchDuringBuildAsync(workload, ct);

        var tree1 = Spread.Of(treeRates);
        var queue = Spread.Of(queueRates);
        double p50 = Spread.Percentile(latencies, 50), p99 = Spread.Percentile(latencies, 99), max = latencies[^1];
        double bytesPerLocation = (double)counters.BytesAllocated / counters.Locations;
        double bytesPerBlock = (double)counters.BytesAllocated / counters.Blocks;

        Console.WriteLine();
        Console.WriteLine($"{"figure",-44} {"value",14}   target");
        Console.WriteLine($"{"block events/s, through RadixIndex",-44} {queue.Median / 1e6,12:F2} M   >= 2 M  (min {queue.Min / 1e6:F2}, max {queue.Max / 1e6:F2})");
        Console.WriteLine($"{"block events/s, RadixTree directly",-44} {tree1.Median / 1e6,12:F2} M   >= 2 M  (min {tree1.Min / 1e6:F2}, max {tree1.Max / 1e6:F2})");
        Console.WriteLine($"{$"Match of {promptBlocks} blocks, min / p50",-44} {latencies[0],6:F1} / {p50:F1} us");
        Console.WriteLine($"{$"Match of {promptBlocks} blocks, p99",-44} {p99,12:F1} us   < 200 us (max {max:F1})");
        Console.WriteLine($"{"Match mean, wall / process CPU",-44} {matchWallMean,12:F1} us / {matchCpuMean:F1} us (CPU: what a core does when it runs)");
        Console.WriteLine($"{"Match while building, p50 / p99 / max",-44} {during.P50,6:F1} / {during.P99:F1} / {during.Max:F1} us ({during.Calls} calls, {during.GrowthsAhead} growths ahead)");
        Console.WriteLine($"{"bytes per (block, location)",-44} {bytesPerLocation,14:F1}   <= 100");
        Console.WriteLine($"{"bytes per distinct block",-44} {bytesPerBlock,14:F1}");
        Console.WriteLine($"{"blocks / locations / bytes",-44} {counters.Blocks:N0} / {counters.Locations:N0} / {counters.BytesAllocated:N0}");

        var report = JsonReport.Header("index");
        report["blocks"] = blocks;
        report["workers"] = workers;
        report["prompt_blocks"] = promptBlocks;
        report["mixed_holders"] = mixedHolders;
        report["interleaved"] = interleaved;
        report["scattered"] = scattered;
        report["runs"] = runs;
        report["matches"] = matches;
        report["block_events"] = workload.BlockEvents;
        report["events"] = workload.Events.Count;
        report["events_per_second"] = JsonReport.Round(queue.Median);
        report["events_per_second_runs"] = JsonReport.Of(queue);
        report["events_per_second_tree"] = JsonReport.Round(tree1.Median);
        report["events_per_second_tree_runs"] = JsonReport.Of(tree1);
        report["match_p50_us"] = JsonReport.Round(p50);
        report["match_p99_us"] = JsonReport.Round(p99);
        report["match_min_us"] = JsonReport.Round(latencies[0]);
        report["match_max_us"] = JsonReport.Round(max);
        report["load_average_1min"] = JsonReport.Round(LoadAverage());
        report["match_mean_wall_us"] = JsonReport.Round(matchWallMean);
        report["match_mean_cpu_us"] = JsonReport.Round(matchCpuMean);
        report["match_during_build_p50_us"] = JsonReport.Round(during.P50);
        report["match_during_build_p99_us"] = JsonReport.Round(during.P99);
        report["match_during_build_max_us"] = JsonReport.Round(during.Max);
        report["match_during_build_calls"] = during.Calls;
        report["events_per_second_with_reader"] = JsonReport.Round(during.EventsPerSecond);
        report["growths_ahead"] = during.GrowthsAhead;
        report["match_chains"] = workload.MatchChains.Count;
        report["bytes_per_block"] = JsonReport.Round(bytesPerLocation);
        report["bytes_per_distinct_block"] = JsonReport.Round(bytesPerBlock);
        report["locations"] = counters.Locations;
        report["bytes_allocated"] = counters.BytesAllocated;
        report["entry_bytes"] = RadixTree.EntryBytes;
        return report;
    }
}
