using System.Diagnostics;
using KvFabric.Memory;

namespace KvFabric.Bench.References;

/// <summary>
/// The shared-memory limit: one thread copying the same number of blocks of the same size from one region to another,
/// both larger than the caches and pre-faulted, exactly what the shared-memory backend does per chunk.
/// </summary>
public static class MemcpyReference
{
    public static unsafe IReadOnlyList<double> Measure(long blockBytes, int blocks, int runs, int warmups)
    {
        long total = blockBytes * blocks;
        using var src = new AnonymousMemory(total);
        using var dst = new AnonymousMemory(total);
        new Span<byte>((void*)src.Address, (int)Math.Min(total, int.MaxValue)).Fill(1);
        for (long o = 0; o < total; o += 4096)
        {
            ((byte*)src.Address)[o] = 1;
            ((byte*)dst.Address)[o] = 0; // fault every page in before timing
        }
        var gbps = new List<double>();
        for (int r = 0; r < warmups + runs; r++)
        {
            long start = Stopwatch.GetTimestamp();
            for (int b = 0; b < blocks; b++)
            {
                long off = b * blockBytes;
                Buffer.MemoryCopy((byte*)src.Address + off, (byte*)dst.Address + off, blockBytes, blockBytes);
            }
            double seconds = Stopwatch.GetElapsedTime(start).TotalSeconds;
            if (r >= warmups)
                gbps.Add(total / seconds / 1e9);
        }
        return gbps;
    }
}
