namespace KvFabric.Bench.Reporting;

/// <summary>Summary statistics of repeated measurements: the median is the figure, min and max the spread.</summary>
public sealed record Spread(double Median, double Min, double Max, int Runs)
{
    public static Spread Of(IReadOnlyList<double> values)
    {
        if (values.Count == 0)
            throw new ArgumentException("no measurements to summarize", nameof(values));
        var sorted = values.Order().ToArray();
        return new Spread(Percentile(sorted, 50), sorted[0], sorted[^1], sorted.Length);
    }

    /// <summary>Nearest-rank percentile of an ascending array.</summary>
    public static double Percentile(double[] ascending, double p)
    {
        if (ascending.Length == 0)
            return double.NaN;
        if (p >= 100)
            return ascending[^1];
        // Median of an even count is the mean of the two middle values; other percentiles use nearest rank.
        if (p == 50 && ascending.Length % 2 == 0)
            return (ascending[ascending.Length / 2 - 1] + ascending[ascending.Length / 2]) / 2;
        int rank = (int)Math.Ceiling(p / 100 * ascending.Length);
        return ascending[Math.Clamp(rank - 1, 0, ascending.Length - 1)];
    }
}

public static class Sizes
{
    /// <summary>Parses 2MiB, 64KiB, 1GiB, 2M, 512K or a plain byte count (positive).</summary>
    public static long Parse(string text)
    {
        long bytes;
        try
        {
            bytes = KvFabric.Memory.ByteSize.Parse(text);
        }
        catch (ArgumentException e)
        {
            throw new FormatException(e.Message, e);
        }

        return bytes > 0 ? bytes : throw new FormatException($"'{text}' is not a positive size");
    }

    public static string Format(long bytes) => bytes switch
    {
        >= 1L << 30 when bytes % (1L << 30) == 0 => $"{bytes >> 30}GiB",
        >= 1L << 20 when bytes % (1L << 20) == 0 => $"{bytes >> 20}MiB",
        >= 1L << 10 when bytes % (1L << 10) == 0 => $"{bytes >> 10}KiB",
        _ => $"{bytes}B",
    };
}
