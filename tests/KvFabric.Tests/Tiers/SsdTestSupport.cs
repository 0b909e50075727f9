using System.Globalization;
using FASTER.core;
using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;

namespace KvFabric.Tests.Tiers;

internal sealed class TempDir : IDisposable
{
    public TempDir() => Path = Directory.CreateTempSubdirectory("kvfabric-ssd-test-").FullName;
    public string Path { get; }
    public void Dispose() => Directory.Delete(Path, recursive: true);
}

internal static class Ssd
{
    public const int BlockBytes = 64 << 10;

    public static SsdBlockStoreOptions Options(string dir, long capacity = 64L << 20, bool compression = true, Func<string, IDevice>? device = null) => new()
    {
        Directory = dir,
        CapacityBytes = capacity,
        BlockBytes = BlockBytes,
        MaxBlockBytes = BlockBytes,
        Compression = compression,
        LogPageBytes = 1 << 20,
        SegmentBytes = 4 << 20,
        DeviceFactory = device,
    };

    /// <summary>The state of a directory after a crash before any settled mark covered its records: opening verifies
    /// every payload (the mark is a cache of what is known whole; without it nothing is trusted).</summary>
    public static void ForgetSettledMark(string dir) => File.Delete(System.IO.Path.Combine(dir, "settled.slots"));

    /// <summary>The store's secret key, from the directory's format file (what header sectors are sealed with).</summary>
    public static ulong StoreKey(string dir)
    {
        string line = File.ReadAllLines(System.IO.Path.Combine(dir, "kvfabric-ssd.format")).Single(l => l.StartsWith("store_key=", StringComparison.Ordinal));
        return ulong.Parse(line["store_key=".Length..], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture);
    }

    /// <summary>Compaction's copy of the record at <paramref name="from"/> (segment 0), torn by a crash at <paramref name="to"/>:
    /// its header sector sealed for its new place, and only its first <paramref name="landed"/> bytes on disk (the rest
    /// reads as zeros, as preallocated space does).</summary>
    public static void PlaceTornCopy(string dir, long from, long to, int recordBytes, int landed)
    {
        var record = new byte[recordBytes];
        using var f = new FileStream(System.IO.Path.Combine(dir, "blocks.data.0"), FileMode.Open, FileAccess.ReadWrite);
        f.Position = from;
        f.ReadExactly(record);
        SsdRecordHeader.SealSector(record.AsSpan(0, SsdRecordHeader.SectorSize), to, StoreKey(dir));
        record.AsSpan(landed).Clear();
        f.Position = to;
        f.Write(record);
    }

    public static IDevice RealDevice(string logPath) =>
        new DirectFileDevice(logPath, 4096, BlockBytes + 256);

    public static BlockKey Key(int i) => SsdWriterTool.KeyOf(i);

    public static BlockMeta Meta(int i) => SsdWriterTool.MetaOf(i, BlockBytes);

    public static byte[] Block(int i)
    {
        var b = new byte[BlockBytes];
        SsdWriterTool.Fill(i, b);
        return b;
    }

    public static async Task<bool> Write(IBlockStore store, int i) => await store.WriteAsync(Key(i), Meta(i), Block(i));

    public static async Task<byte[]?> Read(IBlockStore store, int i)
    {
        var b = new byte[BlockBytes];
        return await store.ReadAsync(Key(i), b) ? b : null;
    }
}
