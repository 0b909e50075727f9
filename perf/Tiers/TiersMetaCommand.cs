using System.CommandLine;
using System.Diagnostics;
using System.Text.Json.Nodes;
using KvFabric.Bench.Reporting;
using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;

namespace KvFabric.Bench.Tiers;

// `kvfabric-bench tiers-meta`: the tier manager's metadata operations on one thread, with null stores so no bytes move.
// Reference: the same number of Dictionary<BlockKey,int> probes, the floor of any hash-indexed lookup.
public static class TiersMetaCommand
{
    public static Command Create()
    {
        var chain = new Option<int>("--chain") { Description = "blocks per chain looked up", DefaultValueFactory = _ => 64 };
        var blocks = new Option<int>("--blocks") { Description = "blocks resident in the tier", DefaultValueFactory = _ => 65536 };
        var runs = new Option<int>("--runs") { Description = "measured runs (the median is reported)", DefaultValueFactory = _ => 5 };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("tiers-meta", "Tier manager metadata throughput: lookup of a chain, put (metadata part), put with eviction.")
        {
            chain, blocks, runs, json,
        };
        cmd.SetAction(async (p, ct) =>
        {
            var result = await RunAsync(p.GetValue(chain), p.GetValue(blocks), p.GetValue(runs));
            foreach (var (name, s) in result)
                Console.WriteLine($"{name,-36} {s.Median / 1e6,8:F2} M/s  (min {s.Min / 1e6:F2}, max {s.Max / 1e6:F2})");
            var report = JsonReport.Header("tiers-meta");
            foreach (var (name, s) in result)
                report[name] = JsonReport.Of(s);
            JsonReport.Write(p.GetValue(json), report);
            return 0;
        });
        return cmd;
    }

    private static TierManager NewManager(long capacityBlocks, int blockBytes) => new(new TierManagerOptions
    {
        Tiers = [new TierOptions { Store = new KeyOnlyBlockStore(TierKind.Host, capacityBlocks * blockBytes), Policy = new LruPolicy((int)capacityBlocks) }],
        PromoteOnHit = false,
    });

    public static async Task<List<(string Name, Spread Rate)>> RunAsync(int chainLength, int residentBlocks, int runs)
    {
        if (chainLength <= 0 || residentBlocks < chainLength || runs <= 0)
            throw new ArgumentException($"--chain {chainLength} --blocks {residentBlocks} --runs {runs}: need chain > 0, blocks >= chain, runs > 0");
        const int blockBytes = 1;
        var payload = new byte[blockBytes];
        int chains = residentBlocks / chainLength;
        var hashes = new BlockHash[chains][];
        var puts = new BlockPut[chains][];
        for (int c = 0; c < chains; c++)
        {
            hashes[c] = new BlockHash[chainLength];
            puts[c] = new BlockPut[chainLength];
            for (int i = 0; i < chainLength; i++)
            {
                hashes[c][i] = new BlockHash((ulong)c * 0x9E3779B97F4A7C15UL, (ulong)i * 0xC2B2AE3D27D4EB4FUL + (ulong)c);
                puts[c][i] = new BlockPut(hashes[c][i], payload);
            }
        }
        var rates = new Dictionary<string, (List<double> Wall, List<double> Cpu)>();
        void Record(string name, double operations, Interval interval)
        {
            if (!rates.TryGetValue(name, out var lists))
                rates[name] = lists = ([], []);
            lists.Wall.Add(operations / interval.WallSeconds);
            lists.Cpu.Add(operations / interval.CpuSeconds);
        }
        var tiers = new TierKind[chainLength];
        // Run -1 warms up, repeated for at least 2 s: with tiered compilation on (as users run it) the hot loops reach
        // tier 1 only after some seconds; one pass would time part of the first runs on tier-0 or OSR code.
        for (int run = -1, warm = Environment.TickCount; run < runs; run += run >= 0 || Environment.TickCount - warm >= 2000 ? 1 : 0)
        {
            // Put with room: every block is new, nothing is evicted.
            using var manager = NewManager(residentBlocks, blockBytes);
            var clock = Interval.Start();
            for (int c = 0; c < chains; c++)
                await manager.PutAsync(0, null, puts[c]);
            var put = clock.Stop();

            // Lookup of whole chains, all hits.
            int rounds = Math.Max(1, 2_000_000 / residentBlocks);
            long found = 0;
            clock = Interval.Start();
            for (int r = 0; r < rounds; r++)
            {
                for (int c = 0; c < chains; c++)
                    found += manager.Lookup(0, hashes[c], tiers).Matched;
            }
            var lookup = clock.Stop();
            if (found != (long)rounds * chains * chainLength)
                throw new InvalidOperationException($"lookup found {found} blocks, expected {(long)rounds * chains * chainLength}");

            // Reference: the bare dictionary probes the lookups make.
            var dict = new Dictionary<BlockKey, int>(residentBlocks); // the default comparer: what a plain map would pay
            for (int c = 0; c < chains; c++)
            {
                for (int i = 0; i < chainLength; i++)
                    dict[new BlockKey(0, hashes[c][i])] = c * chainLength + i;
            }
            long sum = 0;
            clock = Interval.Start();
            for (int r = 0; r < rounds; r++)
            {
                for (int c = 0; c < chains; c++)
                {
                    var h = hashes[c];
                    for (int i = 0; i < h.Length; i++)
                        sum += dict.TryGetValue(new BlockKey(0, h[i]), out int v) ? v : 0;
                }
            }
            var probes = clock.Stop();
            GC.KeepAlive(sum);

            // Put with eviction: a tier of half the blocks, so in steady state every new block evicts one (a leaf, dropped).
            using var small = NewManager(residentBlocks / 2, blockBytes);
            clock = Interval.Start();
            for (int c = 0; c < chains; c++)
                await small.PutAsync(0, null, puts[c]);
            var evict = clock.Stop();
            long expected = (long)chains * chainLength - residentBlocks / 2;
            if (small.Stats().Tiers[0].Evictions != expected)
                throw new InvalidOperationException($"expected {expected} evictions, got {small.Stats().Tiers[0].Evictions}");

            if (run < 0)
                continue;
            double blocks = (double)chains * chainLength;
            Record($"lookup_{chainLength}_block_chains", rounds * (double)chains, lookup);
            Record("lookup_blocks", rounds * blocks, lookup);
            Record($"reference_dictionary_{chainLength}_probes", rounds * (double)chains, probes);
            Record("put_blocks_metadata", blocks, put);
            Record("put_blocks_with_eviction", blocks, evict);
        }
        var result = new List<(string, Spread)>();
        foreach (var (name, (wall, cpu)) in rates)
        {
            result.Add((name, Spread.Of(wall)));
            result.Add((name + "_per_cpu_second", Spread.Of(cpu)));
        }
        return result;
    }

    // Wall time and this process's CPU time over one phase: on a shared machine the second shows what one core does
    // when it runs, the first what this run got.
    private readonly record struct Interval(long Start0, TimeSpan Cpu0, double WallSeconds, double CpuSeconds)
    {
        public static Interval Start() => new(Stopwatch.GetTimestamp(), Process.GetCurrentProcess().TotalProcessorTime, 0, 0);

        public Interval Stop() => this with
        {
            WallSeconds = Stopwatch.GetElapsedTime(Start0).TotalSeconds,
            CpuSeconds = Math.Max(1e-9, (Process.GetCurrentProcess().TotalProcessorTime - Cpu0).TotalSeconds),
        };
    }
}
