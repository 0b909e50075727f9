using System.Diagnostics;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

/// <summary>
/// Runs only as root (it mounts a small tmpfs to fill a real file system). Under scripts/test.sh (the README's test
/// command and CI's, which run as root: they install packages) KVFABRIC_NO_SKIP=1 makes it always run, so a run
/// that lost root fails here instead of skipping the real full-disk test.
/// </summary>
public sealed class RootFactAttribute : FactAttribute
{
    public RootFactAttribute()
    {
        if (Environment.GetEnvironmentVariable("KVFABRIC_NO_SKIP") != "1" && (!OperatingSystem.IsLinux() || Environment.UserName != "root"))
            Skip = "NOT RUN: needs root on Linux to mount a small tmpfs (a real full file system); SsdTombstoneLogNoSpaceTests' injected ENOSPC covers the same code";
    }
}

// A full file system under the tombstone log pauses the log, as it pauses data writes, instead of breaking removals (and
// writes) until a restart; meanwhile removals are made durable as tombstone sectors in the preallocated data segments.
public sealed class SsdTombstoneLogNoSpaceTests
{
    private static SsdBlockStoreOptions Options(string dir, Func<bool> full, Action<FaultyDevice>? created = null) =>
        Ssd.Options(dir, compression: false, device: path =>
        {
            var d = new FaultyDevice(Ssd.RealDevice(path)) { FailWhen = full };
            created?.Invoke(d);
            return d;
        }) with { NoSpaceRetry = TimeSpan.FromMilliseconds(200) };

    // What a crash would leave: the directory's files as they are on disk now, while the store still runs.
    internal static TempDir CrashImage(string dir)
    {
        var image = new TempDir();
        foreach (string f in Directory.EnumerateFiles(dir))
        {
            if (!f.EndsWith(".lock", StringComparison.Ordinal))
                File.Copy(f, Path.Combine(image.Path, Path.GetFileName(f)));
        }
        return image;
    }

    internal static async Task WaitFor(Func<bool> condition, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"timed out waiting until {what}");
            await Task.Delay(5);
        }
    }

    // Every block in `removed` is absent and every other one of 0..last reads back byte-exact (a crash image or a restart).
    private static async Task AssertBlocks(SsdBlockStore store, int last, params int[] removed)
    {
        for (int i = 0; i <= last; i++)
        {
            if (removed.Contains(i))
                Assert.Null(await Ssd.Read(store, i));
            else
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        Assert.Equal(0, store.RecoveredCorruptRecords);
    }

    [Fact]
    public async Task A_full_disk_pauses_the_log_removals_stay_durable_as_tombstone_sectors_and_go_to_the_log_once_space_is_back()
    {
        using var dir = new TempDir();
        bool full = false;
        var options = Options(dir.Path, () => Volatile.Read(ref full));
        await using var store = await SsdBlockStore.OpenAsync(options);
        for (int i = 0; i < 8; i++)
            Assert.True(await Ssd.Write(store, i));
        Volatile.Write(ref full, true);
        Assert.True(store.Remove(Ssd.Key(0)));
        await WaitFor(() => store.NoSpaceLogCommits > 0, "the commit found the disk full");
        Assert.True(store.RemovalsPaused);
        Assert.True(store.Remove(Ssd.Key(1))); // while paused: waits in memory, and the committer writes its sector
        // Durable as tombstone sectors at the data tail: one per removal the log has not committed.
        await WaitFor(() => store.RemovalsNotDurable == 0, "the removals' tombstone sectors were written");
        Assert.Equal(2, store.TombstoneSectorsWritten);
        Assert.True(store.RemovalsPaused); // the log itself is still paused

        // The store keeps serving: reads, and writes (the data segments are not the log's file).
        Assert.False(store.WritesStopped);
        Assert.True(await Ssd.Write(store, 8));
        for (int i = 2; i <= 8; i++)
            Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        Assert.Null(await Ssd.Read(store, 0));

        // Still full after the pause: the log is reopened and fails again, and its tombstones need no second sector.
        await WaitFor(() => store.NoSpaceLogCommits > 1, "the paused log was tried again");
        Assert.Equal(0, store.RemovalsNotDurable);
        Assert.Equal(2, store.TombstoneSectorsWritten);
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
        {
            // A crash while the disk is still full: the sectors keep the removed blocks removed; every other
            // acknowledged block is there.
            Assert.Equal(2, crashed.RecoveredTombstoneSectors);
            await AssertBlocks(crashed, 8, 0, 1);
        }

        Volatile.Write(ref full, false);
        await WaitFor(() => !store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removals were committed");
        Assert.True(store.Remove(Ssd.Key(2))); // the reopened log takes new tombstones too
        await WaitFor(() => store.RemovalsNotDurable == 0, "the next removal was committed");
        Assert.False(store.WritesStopped);
        Assert.Equal(2, store.TombstoneSectorsWritten); // the log takes tombstones again: no more sectors
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
            await AssertBlocks(crashed, 8, 0, 1, 2);
    }

    // A key removed and written again while the disk is full: its tombstone sector cancels only the copy it removed (the
    // seal covers that address), never the new record above it, whichever of the two lands first.
    [Fact]
    public async Task A_key_written_again_after_its_removal_while_the_disk_is_full_survives_a_crash_with_its_new_bytes()
    {
        using var dir = new TempDir();
        bool full = false;
        await using var store = await SsdBlockStore.OpenAsync(Options(dir.Path, () => Volatile.Read(ref full)));
        for (int i = 0; i < 6; i++)
            Assert.True(await Ssd.Write(store, i));
        Volatile.Write(ref full, true);
        Assert.True(store.Remove(Ssd.Key(0)));
        await WaitFor(() => store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removal's tombstone sector was written");
        // The new record lies above the sector; key 1's is written again before its sector may be.
        byte[] new0 = Ssd.Block(100), new1 = Ssd.Block(101);
        Assert.True(await store.WriteAsync(Ssd.Key(0), Ssd.Meta(0), new0));
        Assert.True(store.Remove(Ssd.Key(1)));
        Assert.True(await store.WriteAsync(Ssd.Key(1), Ssd.Meta(1), new1));
        Assert.True(store.Remove(Ssd.Key(2)));
        await WaitFor(() => store.RemovalsNotDurable == 0, "every removal's tombstone sector was written");
        Assert.Equal(3, store.TombstoneSectorsWritten);
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
        {
            Assert.Equal(3, crashed.RecoveredTombstoneSectors);
            Assert.Equal(new0, await Ssd.Read(crashed, 0));
            Assert.Equal(new1, await Ssd.Read(crashed, 1));
            Assert.Null(await Ssd.Read(crashed, 2));
            for (int i = 3; i < 6; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(crashed, i));
            Assert.Equal(0, crashed.RecoveredCorruptRecords);
        }

        // Removed once more, still full: the second sector cancels the new record too.
        Assert.True(store.Remove(Ssd.Key(0)));
        await WaitFor(() => store.RemovalsNotDurable == 0, "the second removal's tombstone sector was written");
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
        {
            Assert.Null(await Ssd.Read(crashed, 0));
            Assert.Equal(new1, await Ssd.Read(crashed, 1));
            Assert.Null(await Ssd.Read(crashed, 2));
            for (int i = 3; i < 6; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(crashed, i));
        }
    }

    // A restart while the disk is still full (the store closed cleanly, its log never committed the removals): opened on
    // the same full disk, the removed blocks stay removed.
    [Fact]
    public async Task A_restart_while_the_disk_is_still_full_keeps_removed_blocks_removed()
    {
        using var dir = new TempDir();
        bool full = false;
        var options = Options(dir.Path, () => Volatile.Read(ref full)) with { NoSpaceRetry = TimeSpan.FromHours(1) };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 6; i++)
                Assert.True(await Ssd.Write(store, i));
            Volatile.Write(ref full, true);
            Assert.True(store.Remove(Ssd.Key(0)));
            Assert.True(store.Remove(Ssd.Key(3)));
            await WaitFor(() => store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removals' tombstone sectors were written");
        }
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            Assert.Equal(2, store.RecoveredTombstoneSectors);
            await AssertBlocks(store, 5, 0, 3);
            Assert.Equal(0, store.NoSpaceLogCommits);
        }
        Volatile.Write(ref full, false);
        await using (var store = await SsdBlockStore.OpenAsync(options))
            await AssertBlocks(store, 5, 0, 3);
    }

    // The data segments cannot take the sectors either (full too): as without them, the removals wait in memory, are not
    // durable, and are counted; a crash then brings the blocks back, intact; once space is back the log commits them.
    [Fact]
    public async Task Removals_stay_not_durable_and_counted_when_the_data_segments_cannot_take_their_sectors()
    {
        using var dir = new TempDir();
        bool full = false;
        var options = Options(dir.Path, () => Volatile.Read(ref full)) with
        {
            DataWriteFault = () => Volatile.Read(ref full) ? "ENOSPC (injected): No space left on device" : null,
        };
        await using var store = await SsdBlockStore.OpenAsync(options);
        for (int i = 0; i < 4; i++)
            Assert.True(await Ssd.Write(store, i));
        Volatile.Write(ref full, true);
        Assert.True(store.Remove(Ssd.Key(0)));
        await WaitFor(() => store.RemovalsPaused && store.NoSpaceWrites > 0, "the tombstone sector found the data segment full");
        Assert.Equal(1, store.RemovalsNotDurable);
        Assert.Equal(0, store.TombstoneSectorsWritten);
        Assert.False(store.WritesStopped);
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
            await AssertBlocks(crashed, 3);

        Volatile.Write(ref full, false);
        await WaitFor(() => !store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removal was committed");
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
            await AssertBlocks(crashed, 3, 0);
    }

    // Compaction over segments that hold tombstone sectors, while the disk stays full: a sector's segment is retired only
    // with or after the segments of the records it cancels (it lies above them), a cancelled record is never copied
    // forward, and a crash image at each step keeps removed blocks removed and every other one byte-exact.
    [Fact]
    public async Task Compaction_over_tombstone_sectors_while_the_disk_is_full_never_brings_removed_blocks_back()
    {
        using var dir = new TempDir();
        bool full = false;
        // 4 MiB segments hold 60 records of 68 KiB; the default capacity (64 MiB) starts no compaction by itself here. The
        // log is not reopened while the test runs (a reopened log takes a truncation, and compaction its failing commit).
        var options = Options(dir.Path, () => Volatile.Read(ref full)) with { NoSpaceRetry = TimeSpan.FromHours(1) };
        await using var store = await SsdBlockStore.OpenAsync(options); // disposed below, while the test runs
        for (int i = 0; i < 70; i++)
            Assert.True(await Ssd.Write(store, i)); // 0..59 in segment 0, 60..69 in segment 1
        Volatile.Write(ref full, true);
        var removed = Enumerable.Range(0, 30).Concat(Enumerable.Range(60, 5)).ToArray();
        foreach (int i in removed)
            Assert.True(store.Remove(Ssd.Key(i)));
        await WaitFor(() => store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removals' tombstone sectors were written");
        Assert.Equal(removed.Length, store.TombstoneSectorsWritten); // in segment 1, above every record they cancel
        for (int i = 70; i < 120; i++)
            Assert.True(await Ssd.Write(store, i)); // the tail moves on into segment 2

        async Task CheckCrashImage(int sectors)
        {
            using var image = CrashImage(dir.Path);
            await using var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false));
            Assert.Equal(sectors, crashed.RecoveredTombstoneSectors);
            await AssertBlocks(crashed, 119, removed);
        }

        await CheckCrashImage(removed.Length);
        // Segment 0 (records 0..59: 30..59 copied forward, 0..29 cancelled, not copied) goes; the sectors stay, with the
        // cancelled records 60..64 of segment 1.
        await store.CompactOldestSegmentAsync();
        Assert.Null(store.LastCompactionError);
        Assert.False(File.Exists(Path.Combine(dir.Path, "blocks.data.0")));
        await CheckCrashImage(removed.Length);
        // Segment 1 goes, the sectors with the records they cancel.
        await store.CompactOldestSegmentAsync();
        Assert.Null(store.LastCompactionError);
        Assert.False(File.Exists(Path.Combine(dir.Path, "blocks.data.1")));
        await CheckCrashImage(0);
        Assert.Equal(0, store.RemovalsNotDurable); // their records are gone: nothing left to cancel
        await AssertBlocks(store, 119, removed);

        // Space back: shutdown commits the log again, and the store opens with the same blocks.
        Assert.True(store.Remove(Ssd.Key(119)));
        await WaitFor(() => store.RemovalsNotDurable == 0, "the last removal's tombstone sector was written");
        Volatile.Write(ref full, false);
        await store.DisposeAsync();
        await using var reopened = await SsdBlockStore.OpenAsync(options);
        Assert.Equal(1, reopened.RecoveredTombstoneSectors);
        await AssertBlocks(reopened, 119, [.. removed, 119]);
    }

    [Fact]
    public async Task Shutdown_commits_removals_a_full_disk_paused_once_space_is_back()
    {
        using var dir = new TempDir();
        bool full = false;
        var options = Options(dir.Path, () => Volatile.Read(ref full)) with { NoSpaceRetry = TimeSpan.FromHours(1) };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 4; i++)
                Assert.True(await Ssd.Write(store, i));
            Volatile.Write(ref full, true);
            Assert.True(store.Remove(Ssd.Key(0)));
            await WaitFor(() => store.RemovalsPaused, "the commit found the disk full");
            Volatile.Write(ref full, false); // space is back, long before the pause ends: shutdown does not wait for it
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, compression: false)))
        {
            Assert.Null(await Ssd.Read(store, 0));
            for (int i = 1; i < 4; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    // The kernel's ENOSPC from a real full file system (a tmpfs), not an injected one.
    [RootFact]
    public async Task A_real_full_file_system_pauses_removals_and_they_resume_once_space_is_freed()
    {
        using var mount = new TempDir();
        RunMount($"-t tmpfs -o size=40m tmpfs {mount.Path}"); // the store's reserve (SsdBlockStore.FootprintBytes: 27 MiB) must fit
        try
        {
            string dir = Path.Combine(mount.Path, "ssd");
            // Slack 1: the removals below leave no compaction due (its copies would need a new segment, and find no room either).
            var options = Ssd.Options(dir, capacity: 4L << 20, compression: false) with { NoSpaceRetry = TimeSpan.FromMilliseconds(200), CompactionSlack = 1 };
            const int Blocks = 60;
            await using var store = await SsdBlockStore.OpenAsync(options);
            for (int i = 0; i < Blocks; i++)
                Assert.True(await Ssd.Write(store, i));
            string filler = Path.Combine(mount.Path, "filler");
            FillUp(filler);

            // Tombstones fill the log's 4 KiB page, and the next page finds no room.
            int removed = 0;
            while (store.NoSpaceLogCommits == 0 && removed < Blocks - 2)
            {
                Assert.True(store.Remove(Ssd.Key(removed++)));
                await WaitFor(() => store.RemovalsNotDurable == 0 || store.RemovalsPaused, "the removal was committed or paused");
            }
            Assert.True(store.RemovalsPaused, $"{removed} removals never filled the disk");
            Assert.False(store.WritesStopped);
            for (int i = removed; i < Blocks; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
            // The removals the log lost are durable as tombstone sectors in the preallocated data segment: a crash while
            // the disk is still full keeps them removed.
            await WaitFor(() => store.RemovalsNotDurable == 0, "the removals' tombstone sectors were written");
            Assert.True(store.TombstoneSectorsWritten > 0);
            using (var whileFull = CrashImage(dir))
            await using (var reopened = await SsdBlockStore.OpenAsync(Ssd.Options(whileFull.Path, capacity: 4L << 20, compression: false)))
            {
                Assert.Equal(store.TombstoneSectorsWritten, reopened.RecoveredTombstoneSectors);
                for (int i = 0; i < removed; i++)
                    Assert.Null(await Ssd.Read(reopened, i));
                for (int i = removed; i < Blocks; i++)
                    Assert.Equal(Ssd.Block(i), await Ssd.Read(reopened, i));
            }

            File.Delete(filler);
            await WaitFor(() => !store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removals were committed");
            using var image = CrashImage(dir);
            await using var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, capacity: 4L << 20, compression: false));
            for (int i = 0; i < removed; i++)
                Assert.Null(await Ssd.Read(crashed, i));
            for (int i = removed; i < Blocks; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(crashed, i));
        }
        finally
        {
            RunMount($"-l {mount.Path}", "umount");
        }
    }

    private static void FillUp(string path)
    {
        using var f = new FileStream(path, FileMode.Create, FileAccess.Write, FileShare.None, 1);
        var chunk = new byte[4096];
        try
        {
            while (true)
                f.Write(chunk);
        }
        catch (IOException e) when (DirectFileDevice.IsNoSpace(e))
        {
        }
    }

    private static void RunMount(string arguments, string command = "mount")
    {
        using var p = Process.Start(new ProcessStartInfo(command, arguments) { RedirectStandardError = true })!;
        Assert.True(p.WaitForExit(30_000), $"{command} {arguments} did not finish");
        Assert.True(p.ExitCode == 0, $"{command} {arguments} failed: {p.StandardError.ReadToEnd()}");
    }
}
