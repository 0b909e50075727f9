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

// A full file system under the tombstone log pauses removals' durability, as it pauses data writes, instead of
// breaking removals (and writes) until a restart.
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
    private static TempDir CrashImage(string dir)
    {
        var image = new TempDir();
        foreach (string f in Directory.EnumerateFiles(dir))
        {
            if (!f.EndsWith(".lock", StringComparison.Ordinal))
                File.Copy(f, Path.Combine(image.Path, Path.GetFileName(f)));
        }
        return image;
    }

    private static async Task WaitFor(Func<bool> condition, string what)
    {
        var clock = Stopwatch.StartNew();
        while (!condition())
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"timed out waiting until {what}");
            await Task.Delay(5);
        }
    }

    [Fact]
    public async Task A_full_disk_pauses_removals_durability_and_they_become_durable_once_space_is_back()
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
        Assert.True(store.Remove(Ssd.Key(1))); // while paused: waits in memory
        Assert.Equal(2, store.RemovalsNotDurable);

        // The store keeps serving: reads, and writes (the data segments are not the log's file).
        Assert.False(store.WritesStopped);
        Assert.True(await Ssd.Write(store, 8));
        for (int i = 2; i <= 8; i++)
            Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        Assert.Null(await Ssd.Read(store, 0));

        // Still full after the pause: the log is reopened and fails again, nothing is lost meanwhile.
        await WaitFor(() => store.NoSpaceLogCommits > 1, "the paused log was tried again");
        Assert.Equal(2, store.RemovalsNotDurable);
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
        {
            // A crash before the removals' commit brings their blocks back, intact (as before any commit); every
            // acknowledged block is there.
            for (int i = 0; i <= 8; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(crashed, i));
        }

        Volatile.Write(ref full, false);
        await WaitFor(() => !store.RemovalsPaused && store.RemovalsNotDurable == 0, "the removals were committed");
        Assert.True(store.Remove(Ssd.Key(2))); // the reopened log takes new tombstones too
        await WaitFor(() => store.RemovalsNotDurable == 0, "the next removal was committed");
        Assert.False(store.WritesStopped);
        using (var image = CrashImage(dir.Path))
        await using (var crashed = await SsdBlockStore.OpenAsync(Ssd.Options(image.Path, compression: false)))
        {
            for (int i = 0; i < 3; i++)
                Assert.Null(await Ssd.Read(crashed, i));
            for (int i = 3; i <= 8; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(crashed, i));
            Assert.Equal(0, crashed.RecoveredCorruptRecords);
        }
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
