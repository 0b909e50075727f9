using System.Globalization;

namespace KvFabric.Memory;

/// <summary>Byte counts as people write them in flags and configuration files.</summary>
public static class ByteSize
{
    private static readonly (string Suffix, long Factor)[] Units =
    [
        ("KiB", 1L << 10), ("MiB", 1L << 20), ("GiB", 1L << 30), ("TiB", 1L << 40),
        ("KB", 1000L), ("MB", 1000_000L), ("GB", 1000_000_000L), ("TB", 1000_000_000_000L),
        ("K", 1L << 10), ("M", 1L << 20), ("G", 1L << 30), ("T", 1L << 40), ("B", 1L),
    ];

    /// <summary>
    /// Parses "1073741824", "512MiB", "4GiB", "2M" (binary shorthand), "2GB" (decimal), "1.5GiB" into bytes (>= 0).
    /// </summary>
    public static long Parse(string text)
    {
        ArgumentNullException.ThrowIfNull(text);
        string t = text.Trim();
        foreach (var (suffix, factor) in Units)
        {
            if (t.Length > suffix.Length && t.EndsWith(suffix, StringComparison.OrdinalIgnoreCase)
                && double.TryParse(t.AsSpan(0, t.Length - suffix.Length).Trim(), NumberStyles.Float, CultureInfo.InvariantCulture, out double v)
                && v >= 0 && v * factor < long.MaxValue)
                return (long)(v * factor);
        }

        return long.TryParse(t, NumberStyles.Integer, CultureInfo.InvariantCulture, out long n) && n >= 0
            ? n
            : throw new ArgumentException($"'{text}' is not a byte size; write e.g. 1073741824, 512MiB, 4GiB or 2M");
    }
}
