using System.Buffers.Binary;
using System.Diagnostics.CodeAnalysis;

namespace KvFabric.Blocks;

// 128-bit block identity: the first 16 bytes of a SHA-256 digest (docs/hashing.md says why 128 bits suffice).
// Hi/Lo are big-endian halves so that ToString() prints the digest bytes in their natural order.
public readonly record struct BlockHash(ulong Hi, ulong Lo)
{
    public const int Size = 16;

    public static BlockHash FromBytes(ReadOnlySpan<byte> bytes)
    {
        if (bytes.Length != Size)
        {
            throw new ArgumentException($"A BlockHash is exactly {Size} bytes; got {bytes.Length}.", nameof(bytes));
        }

        return FromDigest(bytes);
    }

    // trunc128: any digest of at least 16 bytes, of which only the first 16 count.
    internal static BlockHash FromDigest(ReadOnlySpan<byte> digest) =>
        new(BinaryPrimitives.ReadUInt64BigEndian(digest), BinaryPrimitives.ReadUInt64BigEndian(digest[8..]));

    public void WriteTo(Span<byte> destination)
    {
        if (destination.Length < Size)
        {
            throw new ArgumentException(
                $"A BlockHash needs {Size} bytes of destination; got {destination.Length}.", nameof(destination));
        }

        BinaryPrimitives.WriteUInt64BigEndian(destination, Hi);
        BinaryPrimitives.WriteUInt64BigEndian(destination[8..], Lo);
    }

    public override string ToString()
    {
        Span<byte> bytes = stackalloc byte[Size];
        WriteTo(bytes);
        return Convert.ToHexStringLower(bytes);
    }

    public static BlockHash Parse(string s)
    {
        ArgumentNullException.ThrowIfNull(s);
        if (!TryParse(s.AsSpan(), out var hash))
        {
            string shown = s.Length <= 64 ? s : string.Concat(s.AsSpan(0, 64), "...");
            throw new FormatException($"A BlockHash is written as exactly {2 * Size} hex digits; got \"{shown}\" ({s.Length} chars).");
        }

        return hash;
    }

    public static bool TryParse([NotNullWhen(true)] string? s, out BlockHash hash)
    {
        if (s is null)
        {
            hash = default;
            return false;
        }

        return TryParse(s.AsSpan(), out hash);
    }

    // Accepts upper case too; ToString() always writes lower case.
    public static bool TryParse(ReadOnlySpan<char> s, out BlockHash hash)
    {
        hash = default;
        if (s.Length != 2 * Size || !TryParseHalf(s[..16], out ulong hi) || !TryParseHalf(s[16..], out ulong lo))
        {
            return false;
        }

        hash = new BlockHash(hi, lo);
        return true;
    }

    // Hand-rolled rather than ulong.TryParse so that signs, whitespace or prefixes can never slip through.
    private static bool TryParseHalf(ReadOnlySpan<char> digits, out ulong value)
    {
        value = 0;
        foreach (char c in digits)
        {
            int nibble = c switch
            {
                >= '0' and <= '9' => c - '0',
                >= 'a' and <= 'f' => c - 'a' + 10,
                >= 'A' and <= 'F' => c - 'A' + 10,
                _ => -1,
            };
            if (nibble < 0)
            {
                return false;
            }

            value = (value << 4) | (uint)nibble;
        }

        return true;
    }
}
