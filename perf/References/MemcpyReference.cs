using System.Diagnostics;
using KvFabric.Memory;

namespace KvFabric.Bench.References;

/// <summary>
/// The shared-memory limit: one thread copying the same number of blocks of the same size between the same kinds of
/// memory as the transfer (private pool memory and a /dev/shm segment), pre-faulted, exactly what the shared-memory
/// backend does per chunk. With <c>sharedDestination: false</c> both sides are private anonymous memory (which may use
/// transparent huge pages that tmpfs does not), reported alongside for context.
/// </summary>
public static class MemcpyReference
{
    public static unsafe IReadOnlyList<double> Measure(long blockBytes, int blocks, int runs, int warmups, bool sharedDestination)
    {
        long total = blockBytes * blocks;
        using var src = new AnonymousMemory(total);
        using var dstMemory = sharedDestination ? (IDisposable)SharedMemorySegment.Create(total, "memcpy-ref") : new AnonymousMemory(total);
        var dst = (INativeMemory)dstMemory;
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
