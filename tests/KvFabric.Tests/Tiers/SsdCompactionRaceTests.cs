using FASTER.core;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// Compaction running alongside writers, with a small log geometry (16 KiB pages and segments, 4 KiB blocks) so that a few
// hundred references cross log pages, and a slow log device so that commits stay in flight.
public sealed class SsdCompactionRaceTests
{
    private const int BlockBytes = 4096;

    private static SsdBlockStoreOptions Options(string dir, Func<string, IDevice>? device = null) => new()
    {
        Directory = dir,
        CapacityBytes = 4 << 20,
        BlockBytes = BlockBytes,
        MaxBlockBytes = BlockBytes,
        Compression = false,
        LogPageBytes = 16 << 10,
        SegmentBytes = 16 << 10,
        CompactionSlack = 100, // no automatic compaction: the test runs it
        DeviceFactory = device,
    };

    private static byte[] Block(int i)
    {
        var b = new byte[BlockBytes];
        SsdWriterTool.Fill(i, b);
        return b;
    }

    private static Task<bool> Write(SsdBlockStore store, int i) =>
        store.WriteAsync(SsdWriterTool.KeyOf(i), SsdWriterTool.MetaOf(i, BlockBytes), Block(i)).AsTask();

    [Fact]
    public async Task Log_truncation_keeps_the_references_of_writes_committed_in_the_same_batch_as_compaction()
    {
        using var dir = new TempDir();
        FaultyDevice? device = null;
        const int First = 100, Writers = 250;
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path, p => device = new FaultyDevice(new DirectFileDevice(p, 4096, BlockBytes + 256)))))
        {
            // Data segment 0 full of removed blocks, the tail in segment 1, nothing live.
            for (int i = 0; i < 5; i++)
                Assert.True(await Write(store, i));
            for (int i = 0; i < 5; i++)
                Assert.True(store.Remove(SsdWriterTool.KeyOf(i)));
            // A slow commit: the compaction commits its (empty) move while writers append references behind it, enough
            // to cross a log page; their commit lands after the compaction has chosen where to truncate the log.
            device!.WriteDelayMs = 1500;
            var compaction = store.CompactOldestSegmentAsync();
            var writers = Enumerable.Range(First, Writers).Select(i => Write(store, i)).ToArray();
            await compaction;
            Assert.All(await Task.WhenAll(writers), Assert.True);
            device.WriteDelayMs = 0;
            Assert.Equal(Writers, store.Count);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            var missing = Enumerable.Range(First, Writers).Where(i => !store.Contains(SsdWriterTool.KeyOf(i))).ToArray();
            Assert.True(missing.Length == 0, $"{missing.Length} acknowledged blocks lost after a restart, e.g. {string.Join(", ", missing.Take(5))}");
            var buffer = new byte[BlockBytes];
            for (int i = First; i < First + Writers; i++)
            {
                Assert.True(await store.ReadAsync(SsdWriterTool.KeyOf(i), buffer));
                Assert.Equal(Block(i), buffer);
            }
        }
    }
}

public sealed class DirectFileDeviceTests
{
    [Fact]
    public async Task A_segment_removed_while_being_read_is_neither_recreated_nor_kept_open()
    {
        using var dir = new TempDir();
        string prefix = Path.Combine(dir.Path, "blocks.data");
        const long SegmentBytes = 1 << 20;
        var device = new DirectFileDevice(prefix, 4096, 4096, preallocateBytes: SegmentBytes);
        try
        {
            using var buffer = device.RentBuffer(4096);
            for (int segment = 0; segment < 200; segment++)
            {
                await device.WriteAlignedAsync(segment, 0, buffer, 4096);
                // Readers of the segment (some open it afresh, some use the open handle) race with its removal.
                var readers = Enumerable.Range(0, 8).Select(_ => Task.Run(async () =>
                {
                    using var b = device.RentBuffer(4096);
                    try
                    {
                        await device.ReadAlignedAsync(segment, 0, b, 4096);
                    }
                    catch (IOException)
                    {
                        // removed first: the store retries at the block's new place
                    }
                })).ToArray();
                if (segment % 2 == 0)
                    await Task.Yield();
                device.RemoveSegment(segment);
                await Task.WhenAll(readers);
                Assert.False(File.Exists($"{prefix}.{segment}"), $"segment {segment} was recreated by a read after its removal");
            }
            // No descriptor of a removed (unlinked) segment stays open: it would hold its preallocated space until the store closes.
            var stale = new DirectoryInfo("/proc/self/fd").EnumerateFileSystemInfos()
                .Select(f => f.LinkTarget).Where(t => t is not null && t.StartsWith(prefix, StringComparison.Ordinal)).ToArray();
            Assert.True(stale.Length == 0, $"descriptors still open on removed segments: {string.Join(", ", stale.Take(5))}");
        }
        finally
        {
            device.Dispose();
        }
    }
}

public sealed class SsdSameKeyTests
{
    [Fact]
    public async Task A_same_key_writer_is_not_cancelled_by_the_first_writers_token()
    {
        using var dir = new TempDir();
        await using var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, compression: false));
        for (int i = 0; i < 20; i++)
        {
            using var cts = new CancellationTokenSource();
            var first = store.WriteAsync(Ssd.Key(i), Ssd.Meta(i), Ssd.Block(i), cts.Token).AsTask();
            var second = store.WriteAsync(Ssd.Key(i), Ssd.Meta(i), Ssd.Block(i)).AsTask(); // joins the first writer
            cts.Cancel();
            try
            {
                await first;
            }
            catch (OperationCanceledException)
            {
                // the first writer's own cancellation
            }
            Assert.True(await second, $"block {i}: the second writer was not stored");
            Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }
}

public sealed class SsdDisposeTests
{
    [Fact]
    public async Task Dispose_does_not_hang_on_a_write_cancelled_while_its_payload_is_being_written()
    {
        const int BlockBytes = 8 << 20;
        var block = new byte[BlockBytes];
        Random.Shared.NextBytes(block);
        for (int attempt = 0; attempt < 5; attempt++)
        {
            using var dir = new TempDir();
            var options = Ssd.Options(dir.Path, compression: false) with
            {
                BlockBytes = 0, MaxBlockBytes = BlockBytes, LogPageBytes = 32 << 20, SegmentBytes = 64 << 20,
            };
            var store = await SsdBlockStore.OpenAsync(options);
            var key = Ssd.Key(attempt);
            var meta = new BlockMeta(default, 0, BlockBytes);
            using var cts = new CancellationTokenSource();
            var write = store.WriteAsync(key, meta, block, cts.Token).AsTask(); // its payload write is in flight
            cts.Cancel();
            var dispose = store.DisposeAsync().AsTask();
            await Assert.ThrowsAnyAsync<OperationCanceledException>(() => write);
            Assert.True(await Task.WhenAny(dispose, Task.Delay(TimeSpan.FromSeconds(20))) == dispose,
                $"attempt {attempt}: DisposeAsync still waits for a writer that gave up");
        }
    }
}
