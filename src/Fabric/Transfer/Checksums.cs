using System.Runtime.InteropServices;
using System.Runtime.Intrinsics.Arm;
using System.Runtime.Intrinsics.X86;

namespace KvFabric.Transfer;

/// <summary>Per-block integrity checks verified at the destination.</summary>
public static partial class Checksums
{
    private static readonly Lazy<string?> XxHashProblem = new(ProbeXxHash);

    public static unsafe ulong Compute(ChecksumKind kind, ReadOnlySpan<byte> data) => kind switch
    {
        ChecksumKind.None => 0,
        ChecksumKind.XxHash3 => XxHash3(data),
        ChecksumKind.Crc32C => Crc32C(data),
        _ => throw new ArgumentOutOfRangeException(nameof(kind), kind, "unknown checksum kind"),
    };

    public static ulong Compute(ChecksumKind kind, nint address, int length)
    {
        unsafe { return Compute(kind, new ReadOnlySpan<byte>((void*)address, length)); }
    }

    public static bool IsAvailable(ChecksumKind kind) => kind != ChecksumKind.XxHash3 || XxHashProblem.Value is null;

    /// <summary>Fails early, with the fix, when a checksum's native library is missing.</summary>
    public static void EnsureAvailable(ChecksumKind kind)
    {
        if (kind == ChecksumKind.XxHash3 && XxHashProblem.Value is { } problem)
            throw new TransferException(problem);
    }

    public static unsafe ulong XxHash3(ReadOnlySpan<byte> data)
    {
        fixed (byte* p = data)
            return XXH3_64bits(p, (nuint)data.Length);
    }

    /// <summary>XXH3-64 with a seed: lets a record checksum chain a header hash into its payload hash without a copy.</summary>
    public static unsafe ulong XxHash3(ReadOnlySpan<byte> data, ulong seed)
    {
        fixed (byte* p = data)
            return XXH3_64bits_withSeed(p, (nuint)data.Length, seed);
    }

    public static uint Crc32C(ReadOnlySpan<byte> data)
    {
        uint crc = ~0u;
        if (Sse42.X64.IsSupported)
        {
            ulong c = crc;
            while (data.Length >= 8)
            {
                c = Sse42.X64.Crc32(c, MemoryMarshal.Read<ulong>(data));
                data = data[8..];
            }
            crc = (uint)c;
            foreach (byte b in data)
                crc = Sse42.Crc32(crc, b);
        }
        else if (Crc32.Arm64.IsSupported)
        {
            while (data.Length >= 8)
            {
                crc = Crc32.Arm64.ComputeCrc32C(crc, MemoryMarshal.Read<ulong>(data));
                data = data[8..];
            }
            foreach (byte b in data)
                crc = Crc32.ComputeCrc32C(crc, b);
        }
        else
        {
            foreach (byte b in data)
            {
                crc ^= b;
                for (int k = 0; k < 8; k++)
                    crc = (crc >> 1) ^ (0x82F63B78u & (0u - (crc & 1)));
            }
        }
        return ~crc;
    }

    private static unsafe string? ProbeXxHash()
    {
        try
        {
            byte b = 0;
            XXH3_64bits(&b, 0);
            return null;
        }
        catch (DllNotFoundException)
        {
            return "xxHash checksums need libxxhash.so.0 (Debian package libxxhash0: apt-get install -y libxxhash0), or use Crc32C";
        }
    }

    [LibraryImport("libxxhash.so.0")]
    private static unsafe partial ulong XXH3_64bits(byte* input, nuint length);

    [LibraryImport("libxxhash.so.0")]
    private static unsafe partial ulong XXH3_64bits_withSeed(byte* input, nuint length, ulong seed);
}
