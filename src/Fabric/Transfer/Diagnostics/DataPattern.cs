using System.Buffers.Binary;

namespace KvFabric.Transfer.Diagnostics;

/// <summary>
/// A position-dependent byte pattern: the byte at absolute offset p depends on (seed, p), so any sub-range can be
/// filled in one process and checked in another, and a byte landing at the wrong offset is caught.
/// </summary>
public static class DataPattern
{
    private static ulong Word(ulong seed, long index)
    {
        ulong z = seed + (ulong)index * 0x9E3779B97F4A7C15UL + 0x632BE59BD9B4E019UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    private static byte At(ulong seed, long position) => (byte)(Word(seed, position >> 3) >> (int)((position & 7) * 8));

    public static void Fill(Span<byte> destination, ulong seed, long baseOffset)
    {
        int i = 0;
        for (; i < destination.Length && ((baseOffset + i) & 7) != 0; i++)
            destination[i] = At(seed, baseOffset + i);
        for (; i + 8 <= destination.Length; i += 8)
            BinaryPrimitives.WriteUInt64LittleEndian(destination[i..], Word(seed, (baseOffset + i) >> 3));
        for (; i < destination.Length; i++)
            destination[i] = At(seed, baseOffset + i);
    }

    /// <summary>The index of the first byte that differs from the pattern, or -1.</summary>
    public static long FindMismatch(ReadOnlySpan<byte> data, ulong seed, long baseOffset)
    {
        int i = 0;
        for (; i < data.Length && ((baseOffset + i) & 7) != 0; i++)
        {
            if (data[i] != At(seed, baseOffset + i))
                return i;
        }
        for (; i + 8 <= data.Length; i += 8)
        {
            if (BinaryPrimitives.ReadUInt64LittleEndian(data[i..]) != Word(seed, (baseOffset + i) >> 3))
                break;
        }
        for (; i < data.Length; i++)
        {
            if (data[i] != At(seed, baseOffset + i))
                return i;
        }
        return -1;
    }
}
