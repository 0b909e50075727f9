using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

/// <summary>
/// A record compaction cannot read must not stop compaction at the oldest segment for good (dead space would then grow
/// until the disk filled): it is kept while the error may pass, and dropped after a few failed runs in a row.
/// </summary>
public sealed class SsdCompactionReadErrorTests
{
    [Fact]
    public async Task A_record_compaction_cannot_read_is_kept_at_first_then_dropped_so_the_segment_is_freed()
    {
        using var dir = new TempDir();
        int failNext = 0;
        // Slack 0.99: compaction never starts by itself here; the test runs it. No grace: three failed runs are enough.
        var options = Ssd.Options(dir.Path, capacity: 8L << 20, compression: false) with
        {
            CompactionSlack = 0.99,
            CompactionUnreadableGrace = TimeSpan.Zero,
            DataReadFault = scan => !scan && Interlocked.Decrement(ref failNext) >= 0 ? "injected EIO" : null,
        };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 70; i++)
                Assert.True(await Ssd.Write(store, i));
            for (int i = 1; i < 60; i++)
                Assert.True(store.Remove(Ssd.Key(i))); // the first segment keeps block 0 (its lowest address) live

            for (int attempt = 1; attempt < SsdBlockStore.CompactionReadAttempts; attempt++)
            {
                Volatile.Write(ref failNext, 1); // the read of block 0 fails, the first of the run
                var e = await Assert.ThrowsAsync<IOException>(() => store.CompactOldestSegmentAsync());
                Assert.Contains($"attempt {attempt} of {SsdBlockStore.CompactionReadAttempts}", e.Message);
                Assert.True(store.Contains(Ssd.Key(0)), "a record that failed to read once is kept: the device may recover");
                Assert.Equal(0, store.CompactedSegments);
            }

            Volatile.Write(ref failNext, 1);
            await store.CompactOldestSegmentAsync();
            Assert.Equal(1, store.CompactionDroppedUnreadable);
            Assert.False(store.Contains(Ssd.Key(0)));
            Assert.Equal(1, store.CompactedSegments);
            Assert.Contains("dropped", store.LastCompactionError);
            for (int i = 60; i < 70; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }

        await using (var store = await SsdBlockStore.OpenAsync(options with { DataReadFault = null }))
        {
            Assert.False(store.Contains(Ssd.Key(0)), "the dropped block came back after reopening");
            Assert.Equal(10, store.Count);
        }
    }

    [Fact]
    public async Task Failed_runs_in_quick_succession_drop_nothing_within_the_grace()
    {
        using var dir = new TempDir();
        var options = CompactionFixture.Options(dir.Path, () => 0, "injected EIO (a burst)") with { CompactionUnreadableGrace = TimeSpan.FromHours(1) };
        await using var store = await SsdBlockStore.OpenAsync(options);
        await CompactionFixture.FillAsync(store);
        for (int run = 0; run < 2 * SsdBlockStore.CompactionReadAttempts; run++)
            await Assert.ThrowsAsync<IOException>(() => store.CompactOldestSegmentAsync());
        Assert.True(store.Contains(Ssd.Key(0)), "runs milliseconds apart dropped a block a short error burst made unreadable");
        Assert.Equal(0, store.CompactionDroppedUnreadable);
    }

    [Fact]
    public async Task A_record_that_reads_again_before_the_last_attempt_is_copied_not_dropped()
    {
        using var dir = new TempDir();
        int failNext = 0;
        await using var store = await SsdBlockStore.OpenAsync(CompactionFixture.Options(dir.Path, () => Interlocked.Decrement(ref failNext)));
        await CompactionFixture.FillAsync(store);
        for (int attempt = 1; attempt < SsdBlockStore.CompactionReadAttempts; attempt++)
        {
            Volatile.Write(ref failNext, 1);
            await Assert.ThrowsAsync<IOException>(() => store.CompactOldestSegmentAsync());
        }

        await store.CompactOldestSegmentAsync(); // the device recovered: block 0 is copied, not dropped
        Assert.Equal(0, store.CompactionDroppedUnreadable);
        Assert.Equal(Ssd.Block(0), await Ssd.Read(store, 0));
        Assert.Equal(1, store.CompactedSegments);
    }
}

/// <summary>What the SSD tier takes for a full file system: the IOException .NET raises for ENOSPC.</summary>
public sealed class SsdNoSpaceErrorTests
{
    [Fact]
    public void A_real_ENOSPC_from_the_kernel_is_recognized_as_a_full_file_system()
    {
        // /dev/full answers every write with ENOSPC: the same exception a full segment file system gives a pwrite.
        using var handle = File.OpenHandle("/dev/full", FileMode.Open, FileAccess.Write);
        var e = Assert.ThrowsAny<IOException>(() => RandomAccess.Write(handle, new byte[4096], 0));
        Assert.True(DirectFileDevice.IsNoSpace(e), $"HResult {e.HResult}: {e.Message}");
        Assert.False(DirectFileDevice.IsNoSpace(new IOException("Input/output error", 5)));
    }
}

/// <summary>
/// The failed attempts compaction counts belong to one record: a block removed after a failed attempt and written again
/// later is a new record, which gets every attempt, not what is left of the old one's.
/// </summary>
public sealed class SsdCompactionReadErrorCountTests
{
    [Fact]
    public async Task A_block_written_again_after_a_failed_compaction_read_gets_all_its_attempts()
    {
        using var dir = new TempDir();
        int failNext = 0;
        var options = CompactionFixture.Options(dir.Path, () => Interlocked.Decrement(ref failNext));
        await using var store = await SsdBlockStore.OpenAsync(options);
        await CompactionFixture.FillAsync(store, upTo: 70); // block 0 is the only live record

        Volatile.Write(ref failNext, 1);
        await Assert.ThrowsAsync<IOException>(() => store.CompactOldestSegmentAsync()); // attempt 1 on the old record

        // Evicted, then written again (a cache block comes back): a new record, in a later segment.
        Assert.True(store.Remove(Ssd.Key(0)));
        Assert.True(await Ssd.Write(store, 0));
        for (int i = 100; i < 160; i++)
            Assert.True(await Ssd.Write(store, i)); // the tail leaves the new record's segment
        for (int i = 100; i < 160; i++)
            Assert.True(store.Remove(Ssd.Key(i)));

        // Compaction reaches the new record (segments without live records need no reads); its read fails.
        Volatile.Write(ref failNext, 1);
        IOException? first = null;
        for (int run = 0; run < 10 && first is null; run++)
            first = await Record.ExceptionAsync(() => store.CompactOldestSegmentAsync()) as IOException;
        Assert.NotNull(first);
        Assert.Contains($"attempt 1 of {SsdBlockStore.CompactionReadAttempts}", first.Message);

        Volatile.Write(ref failNext, 1);
        var second = await Assert.ThrowsAsync<IOException>(() => store.CompactOldestSegmentAsync());
        Assert.Contains($"attempt 2 of {SsdBlockStore.CompactionReadAttempts}", second.Message);
        Assert.True(store.Contains(Ssd.Key(0)), "a record that failed to read twice is kept: it has one more attempt");
        Assert.Equal(0, store.CompactionDroppedUnreadable);
        Assert.Equal(Ssd.Block(0), await Ssd.Read(store, 0));
    }
}

/// <summary>Stores whose oldest data segment keeps one live record, block 0: what compaction must copy or drop.</summary>
internal static class CompactionFixture
{
    /// <summary>Slack 0.99: compaction never starts by itself; tests run it. failNext: the next reads that fail.</summary>
    public static SsdBlockStoreOptions Options(string dir, Func<int> failNext, string error = "injected EIO (transient)") =>
        Ssd.Options(dir, capacity: 8L << 20, compression: false) with
        {
            CompactionSlack = 0.99,
            DataReadFault = scan => !scan && failNext() >= 0 ? error : null,
        };

    /// <summary>Writes blocks 0..69 and removes 1..upTo-1, so that block 0 (the lowest address) stays live in the first segment.</summary>
    public static async Task FillAsync(SsdBlockStore store, int upTo = 60)
    {
        for (int i = 0; i < 70; i++)
            Assert.True(await Ssd.Write(store, i));
        for (int i = 1; i < upTo; i++)
            Assert.True(store.Remove(Ssd.Key(i)));
    }
}
