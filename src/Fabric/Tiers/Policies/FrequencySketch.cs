using System.Numerics;

namespace KvFabric.Tiers.Policies;

// A count-min sketch of how often each BlockKey was seen, in fixed memory, that forgets by halving (TinyLFU's
// "reset": Einziger, Friedman and Manes, ACM ToS 2017). It remembers blocks that are no longer resident, which is
// what lets a policy tell a block that comes back from one that was seen once.
//
// Four rows of saturating 4-bit counts (kept one per byte for speed). After samplePeriod increments every counter is
// halved, so a count is an exponentially decayed frequency over roughly the last samplePeriod sightings (TinyLFU:
// 10 × the cache's size). Width = the next power of two at or above 3 × samplePeriod, so at most a third of a row's
// counters are touched per period and a key never seen looks "seen before" (all four rows hit) well under 1% of the
// time: at 8 × the cache's size instead, 8% of first sightings looked like reuse, and under leaf-first each such
// block pinned its whole chain in the tier. Conservative update (only the rows holding the current minimum are
// incremented) keeps over-estimates down further. Memory: 12 × samplePeriod bytes (480 KiB for a 4,000-block tier).
public sealed class FrequencySketch
{
    public const int MaxCount = 15;
    private const int Rows = 4;

    private readonly byte[] _counts;
    private readonly int _mask;
    private readonly int _rowShift;
    private readonly long _samplePeriod;
    private long _increments;

    public FrequencySketch(long samplePeriod)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(samplePeriod, 1);
        long width = BitOperations.RoundUpToPowerOf2((uint)Math.Clamp(3 * samplePeriod, 64, 1L << 26));
        _rowShift = BitOperations.Log2((ulong)width);
        _mask = (int)width - 1;
        _counts = new byte[Rows * width];
        _samplePeriod = samplePeriod;
    }

    public int Width => _mask + 1;

    // Halvings done so far (for tests and diagnostics).
    public long Resets { get; private set; }

    public int Estimate(in BlockKey key)
    {
        ulong h = Mix(key);
        ulong step = (h >> 32) | 1;
        int min = MaxCount;
        for (int r = 0; r < Rows; r++)
        {
            int c = _counts[Index(r, h, step)];
            if (c < min)
                min = c;
        }
        return min;
    }

    // Counts one sighting and returns the new estimate.
    public int Increment(in BlockKey key)
    {
        ulong h = Mix(key);
        ulong step = (h >> 32) | 1;
        Span<int> at = stackalloc int[Rows];
        int min = MaxCount;
        for (int r = 0; r < Rows; r++)
        {
            at[r] = Index(r, h, step);
            int c = _counts[at[r]];
            if (c < min)
                min = c;
        }
        if (min < MaxCount)
        {
            for (int r = 0; r < Rows; r++)
            {
                if (_counts[at[r]] == min)
                    _counts[at[r]] = (byte)(min + 1);
            }
            min++;
        }
        if (++_increments >= _samplePeriod)
            Halve();
        return min;
    }

    private void Halve()
    {
        Span<byte> counts = _counts;
        for (int i = 0; i < counts.Length; i++)
            counts[i] >>= 1;
        _increments /= 2;
        Resets++;
    }

    private int Index(int row, ulong h, ulong step) => (row << _rowShift) | (int)((h + (ulong)row * step) & (ulong)_mask);

    // Block hashes are already uniform, but keys may also be small dense ids (traces, tests): mix all 160 bits.
    internal static ulong Mix(in BlockKey key)
    {
        ulong h = key.Hash.Lo ^ (key.Hash.Hi * 0x9E3779B97F4A7C15UL) ^ ((ulong)key.Tenant << 32 | key.Tenant);
        h ^= h >> 30;
        h *= 0xBF58476D1CE4E5B9UL;
        h ^= h >> 27;
        h *= 0x94D049BB133111EBUL;
        h ^= h >> 31;
        return h;
    }
}
