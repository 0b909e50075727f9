using System.Globalization;
using KvFabric.Blocks;
using KvFabric.Transfer.Diagnostics;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// `kvfabric ssd-writer`: writes numbered blocks with a deterministic pattern and prints "DURABLE i" for each write the store
/// acknowledged. The crash tests SIGKILL it mid-stream and check, in another process, that every acknowledged block is intact.
/// </summary>
public static class SsdWriterTool
{
    public const uint Tenant = 7;

    /// <summary>The options the writer opens its store with; a test reopening the directory must use the same geometry.</summary>
    public static SsdBlockStoreOptions Options(string dir, int blockBytes, long capacityBytes) => new()
    {
        Directory = dir,
        CapacityBytes = capacityBytes,
        BlockBytes = blockBytes,
        MaxBlockBytes = blockBytes,
        LogPageBytes = 1 << 20,
        SegmentBytes = 16 << 20,
    };

    public static BlockKey KeyOf(int i) => new(Tenant, new BlockHash(0x5eed, (ulong)i));

    public static BlockMeta MetaOf(int i, int length) => new(i == 0 ? default : new BlockHash(0x5eed, (ulong)(i - 1)), i, length);

    /// <summary>Block i's bytes: noise for most blocks; every third one is compressible (a short run repeated), so crash runs cover both codecs.</summary>
    public static void Fill(int i, Span<byte> block)
    {
        if (i % 3 != 2)
        {
            DataPattern.Fill(block, (ulong)i, 0);
            return;
        }
        var run = block[..Math.Min(block.Length, 256)];
        DataPattern.Fill(run, (ulong)i, 0);
        for (int at = run.Length; at < block.Length; at += run.Length)
            run[..Math.Min(run.Length, block.Length - at)].CopyTo(block[at..]);
    }

    public static async Task<int> RunAsync(SsdBlockStoreOptions options, int first, int count, int concurrency, TextWriter output, CancellationToken ct)
    {
        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(concurrency);
        int blockBytes = options.BlockBytes > 0 ? options.BlockBytes : throw new ArgumentException("ssd-writer needs a fixed --block-bytes", nameof(options));
        await using var store = await SsdBlockStore.OpenAsync(options, ct).ConfigureAwait(false);
        var sync = new object();
        lock (sync)
            output.WriteLine($"READY {store.Count}");
        int next = first - 1;
        var workers = new Task[concurrency];
        for (int w = 0; w < concurrency; w++)
        {
            workers[w] = Task.Run(async () =>
            {
                byte[] block = new byte[blockBytes];
                int i;
                while ((i = Interlocked.Increment(ref next)) < first + count)
                {
                    Fill(i, block);
                    if (!await store.WriteAsync(KeyOf(i), MetaOf(i, blockBytes), block, ct).ConfigureAwait(false))
                    {
                        lock (sync)
                            output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"FULL {i}"));
                        return;
                    }
                    lock (sync)
                        output.WriteLine(string.Create(CultureInfo.InvariantCulture, $"DURABLE {i}"));
                }
            }, ct);
        }
        await Task.WhenAll(workers).ConfigureAwait(false);
        lock (sync)
            output.WriteLine($"DONE {store.Count}");
        return 0;
    }
}
