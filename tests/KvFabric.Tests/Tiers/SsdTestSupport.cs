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
