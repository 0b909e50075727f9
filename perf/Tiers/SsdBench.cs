using System.Diagnostics;
using KvFabric.Bench.Reporting;
using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;

namespace KvFabric.Bench.Tiers;

public sealed record SsdBenchOptions
{
    public required string Directory { get; init; }
    public int BlockBytes { get; init; } = 2 << 20;
    public int Blocks { get; init; } = 512;
    public int Concurrency { get; init; } = 8;
    public int Runs { get; init; } = 3;
}

public sealed record SsdBenchResult(Spread WriteGbps, double FirstWriteGbps, Spread? SteadyWriteGbps, Spread WriteCompressedGbps, Spread ReadGbps, Spread RandomReadGbps, Spread OpenSeconds,
    Spread WriteCpuSecondsPerGb, Spread ReadCpuSecondsPerGb);

/// <summary>
/// The SSD tier end to end: N writers put distinct 2 MiB blocks of noise (what fp16 KV looks like to zstd) until the set is
/// written and acknowledged durable, then the store is closed and reopened (recovery scan timed) and the blocks are read back
/// in write order and in a shuffled order, every read checksum-verified. The uncompressed runs share one store: after each
/// run (untimed) its blocks are removed and compaction retires their segments as spares, so the first run writes new space
/// and the later ones write space the disk has already written, the store's steady state (as fio's overwrite).
/// </summary>
public static class SsdBench
{
    public static async Task<SsdBenchResult> RunAsync(SsdBenchOptions o, Action<string> status, CancellationToken ct)
    {
        // A few distinct noise buffers, cycled under distinct keys: the disk sees distinct blocks, memory stays small.
        var sources = new byte[Math.Min(o.Blocks, 16)][];
        var rng = new Random(42);
        for (int i = 0; i < sources.Length; i++)
            rng.NextBytes(sources[i] = new byte[o.BlockBytes]);
        long total = (long)o.BlockBytes * o.Blocks;
        var write = new List<double>();
        var writeCompressed = new List<double>();
        var read = new List<double>();
        var randomRead = new List<double>();
        var open = new List<double>();
        var writeCpu = new List<double>();
        var readCpu = new List<double>();
        status("warm-up (untimed): FASTER's page buffers, the JIT, the device threads");
        await WarmUpAsync(o, sources, ct);
        // One store for the raw runs, one for the zstd runs: each run writes, then (untimed) removes its blocks.
        string[] dirs = [Path.Combine(o.Directory, "ssd-raw"), Path.Combine(o.Directory, "ssd-zstd")];
        foreach (string d in dirs)
        {
            if (System.IO.Directory.Exists(d))
                System.IO.Directory.Delete(d, recursive: true);
        }
        try
        {
            for (int run = 0; run < o.Runs; run++)
                await RunOnceAsync(run);
        }
        finally
        {
            foreach (string d in dirs)
            {
                if (System.IO.Directory.Exists(d))
                    System.IO.Directory.Delete(d, recursive: true);
            }
        }
        return new SsdBenchResult(Spread.Of(write), write[0], write.Count > 1 ? Spread.Of(write.Skip(1).ToList()) : null, Spread.Of(writeCompressed),
            Spread.Of(read), Spread.Of(randomRead), Spread.Of(open), Spread.Of(writeCpu), Spread.Of(readCpu));

        async Task RunOnceAsync(int run)
        {
            foreach (bool compression in new[] { false, true })
            {
                string dir = dirs[compression ? 1 : 0];
                var options = new SsdBlockStoreOptions
                {
                    Directory = dir,
                    CapacityBytes = total,
                    BlockBytes = o.BlockBytes,
                    MaxBlockBytes = o.BlockBytes,
                    Compression = compression,
                    CompactionSlack = 0.05, // removing a run's blocks retires all the segments the tail has left
                };
                BlockKey Key(int i) => SsdBench.Key(run, i);
                status($"run {run + 1}/{o.Runs}: write {Sizes.Format(total)}{(compression ? " (zstd on)" : "")}");
                await using (var store = await SsdBlockStore.OpenAsync(options, ct))
                {
                    var cpu0 = Process.GetCurrentProcess().TotalProcessorTime; // after opening: FASTER zeroes its page buffers there
                    double s = await ParallelAsync(o, i => store.WriteAsync(Key(i), new BlockMeta(default, 0, o.BlockBytes), sources[i % sources.Length], ct), ct);
                    (compression ? writeCompressed : write).Add(total / s / 1e9);
                    if (!compression)
                        writeCpu.Add((Process.GetCurrentProcess().TotalProcessorTime - cpu0).TotalSeconds / (total / 1e9));
                    else
                        await RemoveAllAsync(store, Key);
                }
                if (compression)
                    continue;
                status($"run {run + 1}/{o.Runs}: reopen and read {Sizes.Format(total)}");
                long t0 = Stopwatch.GetTimestamp();
                await using (var store = await SsdBlockStore.OpenAsync(options, ct))
                {
                    open.Add(Stopwatch.GetElapsedTime(t0).TotalSeconds);
                    if (store.Count != o.Blocks)
                        throw new InvalidOperationException($"reopened store holds {store.Count} blocks, {o.Blocks} were written");
                    var buffers = new ThreadLocal<byte[]>(() => new byte[o.BlockBytes]);
                    var cpu1 = Process.GetCurrentProcess().TotalProcessorTime;
                    read.Add(total / await ParallelAsync(o, i => ReadAsync(store, Key(i), buffers.Value!, ct), ct) / 1e9);
                    readCpu.Add((Process.GetCurrentProcess().TotalProcessorTime - cpu1).TotalSeconds / (total / 1e9));
                    int[] order = Enumerable.Range(0, o.Blocks).ToArray();
                    new Random(run).Shuffle(order);
                    randomRead.Add(total / await ParallelAsync(o, i => ReadAsync(store, Key(order[i]), buffers.Value!, ct), ct) / 1e9);
                    await RemoveAllAsync(store, Key);
                }
            }

            async Task RemoveAllAsync(SsdBlockStore store, Func<int, BlockKey> key)
            {
                status($"run {run + 1}/{o.Runs}: remove the run's blocks; compaction retires their segments (untimed)");
                for (int i = 0; i < o.Blocks; i++)
                    store.Remove(key(i));
                await store.WaitForCompactionAsync();
            }
        }
    }

    private static async Task WarmUpAsync(SsdBenchOptions o, byte[][] sources, CancellationToken ct)
    {
        string dir = Path.Combine(o.Directory, "ssd-warmup");
        if (System.IO.Directory.Exists(dir))
            System.IO.Directory.Delete(dir, recursive: true);
        var warm = o with { Blocks = Math.Min(o.Blocks, 64) };
        try
        {
            await using var store = await SsdBlockStore.OpenAsync(new SsdBlockStoreOptions
            {
                Directory = dir,
                CapacityBytes = (long)o.BlockBytes * warm.Blocks,
                BlockBytes = o.BlockBytes,
                MaxBlockBytes = o.BlockBytes,
            }, ct);
            await ParallelAsync(warm, i => store.WriteAsync(Key(-1, i), new BlockMeta(default, 0, o.BlockBytes), sources[i % sources.Length], ct), ct);
            var buffer = new byte[o.BlockBytes];
            await ParallelAsync(warm with { Concurrency = 1 }, i => ReadAsync(store, Key(-1, i), buffer, ct), ct);
        }
        finally
        {
            System.IO.Directory.Delete(dir, recursive: true);
        }
    }

    private static BlockKey Key(int run, int i) => new(1, new BlockHash(0xbe9c + (ulong)(run + 1), (ulong)i));

    private static async ValueTask<bool> ReadAsync(SsdBlockStore store, BlockKey key, byte[] buffer, CancellationToken ct) =>
        await store.ReadAsync(key, buffer, ct).ConfigureAwait(false) ? true : throw new InvalidOperationException($"block {key} is missing");

    // Runs op(0..Blocks-1) with Concurrency operations in flight; returns the seconds from first start to last finish.
    private static async Task<double> ParallelAsync(SsdBenchOptions o, Func<int, ValueTask<bool>> op, CancellationToken ct)
    {
        int next = -1;
        long start = Stopwatch.GetTimestamp();
        var workers = Enumerable.Range(0, o.Concurrency).Select(_ => Task.Run(async () =>
        {
            int i;
            while ((i = Interlocked.Increment(ref next)) < o.Blocks)
            {
                if (!await op(i).ConfigureAwait(false))
                    throw new InvalidOperationException($"the SSD tier declined block {i} (capacity)");
            }
        }, ct)).ToArray();
        await Task.WhenAll(workers).ConfigureAwait(false);
        return Stopwatch.GetElapsedTime(start).TotalSeconds;
    }
}
