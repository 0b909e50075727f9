using FASTER.core;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// Compaction against removals, with a small geometry (4 KiB blocks, so 8 KiB records, two per 16 KiB data segment, and
// 16 KiB log pages holding about 200 tombstones each).
public sealed class SsdCompactionRaceTests
{
    private const int BlockBytes = 4096;

    private static SsdBlockStoreOptions Options(string dir, Func<string?>? writeHook = null) => new()
    {
        Directory = dir,
        CapacityBytes = 4 << 20,
        BlockBytes = BlockBytes,
        MaxBlockBytes = BlockBytes,
        Compression = false,
        LogPageBytes = 16 << 10,
        SegmentBytes = 16 << 10,
        CompactionSlack = 100, // no automatic compaction: the test runs it
        DataWriteFault = writeHook,
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
    public async Task A_block_removed_while_compaction_copies_it_stays_removed_after_a_restart()
    {
        using var dir = new TempDir();
        using var copying = new SemaphoreSlim(0);
        using var release = new SemaphoreSlim(0);
        int hold = 0;
        var options = Options(dir.Path, () =>
        {
            if (Interlocked.Exchange(ref hold, 0) == 1)
            {
                copying.Release();
                Assert.True(release.Wait(TimeSpan.FromSeconds(30)));
            }
            return null;
        });
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 4; i++)
                Assert.True(await Write(store, i)); // 0 and 1 in data segment 0, 2 and 3 in segment 1
            Assert.True(store.Remove(SsdWriterTool.KeyOf(1)));
            Volatile.Write(ref hold, 1); // the next record write is compaction's copy of block 0: held until released
            var compaction = Task.Run(store.CompactOldestSegmentAsync);
            Assert.True(await copying.WaitAsync(TimeSpan.FromSeconds(30)), "compaction did not start copying block 0");
            Assert.True(store.Remove(SsdWriterTool.KeyOf(0))); // while its copy is being written
            release.Release();
            await compaction.WaitAsync(TimeSpan.FromSeconds(30));
            Assert.False(store.Contains(SsdWriterTool.KeyOf(0)));
        }
        // The copy is sealed and on disk; the tombstone must cancel it too, or block 0 comes back.
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.False(store.Contains(SsdWriterTool.KeyOf(0)), "a block removed during its compaction copy came back after a restart");
            Assert.False(store.Contains(SsdWriterTool.KeyOf(1)));
            Assert.Equal(2, store.Count);
            Assert.Equal(0, store.RecoveredCorruptRecords);
        }
    }

    [Fact]
    public async Task A_key_written_again_after_its_segments_are_gone_is_not_cancelled_by_its_old_tombstone()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.True(await Write(store, 0));
            Assert.True(await Write(store, 1)); // data segment 0 exactly full
            Assert.True(store.Remove(SsdWriterTool.KeyOf(0)));
            Assert.True(store.Remove(SsdWriterTool.KeyOf(1)));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
            Assert.Equal(0, store.Count); // nothing live: the segment is retired, the tombstones stay in the log
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
            Assert.True(await Write(store, 0)); // must land past the address the old tombstone cancels
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.True(store.Contains(SsdWriterTool.KeyOf(0)), "an acknowledged block was cancelled by a tombstone of its earlier copy");
            var buffer = new byte[BlockBytes];
            Assert.True(await store.ReadAsync(SsdWriterTool.KeyOf(0), buffer));
            Assert.Equal(Block(0), buffer);
        }
    }

    [Fact]
    public async Task A_removal_during_a_copy_that_fails_does_not_cancel_the_keys_next_write()
    {
        using var dir = new TempDir();
        SsdBlockStore? open = null;
        int hold = 0;
        var options = Options(dir.Path, () =>
        {
            if (Interlocked.Exchange(ref hold, 0) != 1)
                return null;
            Assert.True(open!.Remove(SsdWriterTool.KeyOf(0))); // while compaction copies block 0: the tombstone covers the copy
            return "Input/output error (injected EIO)";
        });
        await using (var store = open = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 3; i++)
                Assert.True(await Write(store, i));
            Assert.True(store.Remove(SsdWriterTool.KeyOf(1)));
            Volatile.Write(ref hold, 1);
            await Assert.ThrowsAnyAsync<Exception>(store.CompactOldestSegmentAsync); // the copy fails: nothing lands there
            var refused = await Assert.ThrowsAsync<TierException>(() => Write(store, 5));
            Assert.Contains("stopped accepting writes", refused.Message);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.False(store.Contains(SsdWriterTool.KeyOf(0))); // the removal was committed despite the data-segment error
            Assert.True(await Write(store, 0));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
            Assert.True(store.Contains(SsdWriterTool.KeyOf(0)), "an acknowledged block was cancelled by the tombstone of a copy that never landed");
    }

    [Fact]
    public async Task A_segment_file_left_below_the_compacted_range_is_retired_before_its_tombstones_go()
    {
        using var dir = new TempDir();
        string first = Path.Combine(dir.Path, "blocks.data.0");
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 400; i++)
                Assert.True(await Write(store, i));
            byte[] segment0 = await File.ReadAllBytesAsync(first); // blocks 0 and 1
            for (int i = 0; i < 300; i++)
                Assert.True(store.Remove(SsdWriterTool.KeyOf(i)));
            for (int segment = 0; segment < 149; segment++)
                await store.CompactOldestSegmentAsync(); // their tombstones' first log page is truncated on the way
            // A segment whose retirement failed earlier (a rename or delete that did not happen), found below a gap.
            await File.WriteAllBytesAsync(first, segment0);
            await store.CompactOldestSegmentAsync();
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.False(store.Contains(SsdWriterTool.KeyOf(0)), "a removed block came back from a segment file compaction left behind");
            Assert.False(store.Contains(SsdWriterTool.KeyOf(1)));
            Assert.Equal(100, store.Count);
        }
    }

    [Fact]
    public async Task Log_truncation_drops_only_tombstones_of_deleted_segments()
    {
        using var dir = new TempDir();
        const int Blocks = 400, Removed = 300;
        long logBefore, logAfter;
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < Blocks; i++)
                Assert.True(await Write(store, i));
            for (int i = 0; i < Removed; i++)
                Assert.True(store.Remove(SsdWriterTool.KeyOf(i))); // 300 tombstones: past the first 16 KiB log page
            Assert.True(store.Remove(SsdWriterTool.KeyOf(Blocks - 1))); // its record stays in the newest segment
            logBefore = store.TombstoneLogBytes;
            for (int segment = 0; segment < Removed / 2; segment++)
                await store.CompactOldestSegmentAsync();
            Assert.Equal(Removed / 2, store.CompactedSegments);
            logAfter = store.TombstoneLogBytes;
        }
        // The first 16 KiB page held only tombstones of compacted segments: it went; the rest is kept.
        Assert.True(logAfter <= logBefore - (15 << 10) && logAfter > 0, $"the tombstone log spanned {logBefore} bytes before compaction and {logAfter} after");
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(0, store.RecoveredCorruptRecords);
            Assert.False(store.Contains(SsdWriterTool.KeyOf(Blocks - 1)), "a removed block came back: its tombstone was truncated with the log");
            Assert.Equal(Blocks - Removed - 1, store.Count);
            var buffer = new byte[BlockBytes];
            for (int i = Removed; i < Blocks - 1; i++)
            {
                Assert.True(await store.ReadAsync(SsdWriterTool.KeyOf(i), buffer));
                Assert.Equal(Block(i), buffer);
            }
        }
    }
}

public sealed class DirectFileDeviceTests
{
    // open(2) flag values differ by architecture; 0x4000 is O_DIRECTORY on arm64 (docs/operations.md: x86-64 or arm64).
    [Theory]
    [InlineData(System.Runtime.InteropServices.Architecture.X64, 0x4000)]
    [InlineData(System.Runtime.InteropServices.Architecture.Arm64, 0x10000)]
    [InlineData(System.Runtime.InteropServices.Architecture.Arm, 0x10000)]
    [InlineData(System.Runtime.InteropServices.Architecture.Ppc64le, 0x20000)]
    [InlineData(System.Runtime.InteropServices.Architecture.RiscV64, 0x4000)]
    public void O_DIRECT_has_the_value_of_the_architecture(System.Runtime.InteropServices.Architecture architecture, int flag) =>
        Assert.Equal(flag, DirectFileDevice.DirectFlag(architecture));

    [Fact]
    public async Task Segments_on_a_file_system_with_O_DIRECT_are_opened_with_it()
    {
        using var dir = new TempDir();
        using var device = new DirectFileDevice(Path.Combine(dir.Path, "blocks.data"), 4096, 8192);
        using (var buffer = device.RentBuffer(4096))
            await device.WriteAlignedAsync(0, 0, buffer, 4096);
        string fileSystem = new DriveInfo(dir.Path).DriveFormat;
        if (fileSystem is "ext4" or "xfs" or "btrfs") // file systems that take O_DIRECT on every kernel
            Assert.True(device.Direct, $"segments in {dir.Path} ({fileSystem}) went through the page cache");
    }

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
    public async Task Dispose_does_not_hang_on_a_write_cancelled_while_its_record_is_being_written()
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
            var write = store.WriteAsync(key, meta, block, cts.Token).AsTask(); // its record write is in flight
            cts.Cancel();
            var dispose = store.DisposeAsync().AsTask();
            // Issued before the cancellation: it completes (true); not yet issued: cancelled. Either way, nothing hangs.
            var outcome = await Record.ExceptionAsync(() => write.WaitAsync(TimeSpan.FromSeconds(20)));
            Assert.True(outcome is null or OperationCanceledException, $"attempt {attempt}: the write ended with {outcome}");
            Assert.True(await Task.WhenAny(dispose, Task.Delay(TimeSpan.FromSeconds(20))) == dispose,
                $"attempt {attempt}: DisposeAsync still waits for a writer that gave up");
        }
    }
}
