using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// Disposal of the SSD store while operations are under way: nothing may touch what disposal has closed.
public sealed class SsdDisposeRaceTests
{
    private const int Record = 4096 + Ssd.BlockBytes;

    // A read that started before Dispose finds its record corrupt after the tombstone log was closed. Dropping the block
    // would append a tombstone to the disposed FasterLog (into pages it has freed, never committed): the read must leave
    // the log alone.
    [Fact]
    public async Task A_read_that_finds_a_corrupt_record_after_the_log_closed_appends_nothing_to_it()
    {
        using var dir = new TempDir();
        using var logClosed = new ManualResetEventSlim();
        using var readDone = new ManualResetEventSlim();
        FaultyDevice? log = null;
        int holdRead = 0;
        var options = Ssd.Options(dir.Path, compression: false, device: path => log = new FaultyDevice(Ssd.RealDevice(path))) with
        {
            DataReadFault = scan =>
            {
                if (!scan && Interlocked.Exchange(ref holdRead, 0) == 1)
                    Assert.True(logClosed.Wait(TimeSpan.FromSeconds(30)), "the store never closed its log");
                return null;
            },
        };
        var store = await SsdBlockStore.OpenAsync(options);
        for (int i = 0; i < 4; i++)
            Assert.True(await Ssd.Write(store, i));
        using (var f = new FileStream(Path.Combine(dir.Path, "blocks.data.0"), FileMode.Open, FileAccess.ReadWrite))
        {
            f.Position = Record + 4096 + 100; // a byte of block 1's payload
            int b = f.ReadByte();
            f.Position--;
            f.WriteByte((byte)(b ^ 0x5A));
        }
        long logBytes = store.TombstoneLogBytes;
        log!.OnDispose = () =>
        {
            logClosed.Set(); // the log is closed; the data device is still open, so the held read goes ahead
            Assert.True(readDone.Wait(TimeSpan.FromSeconds(30)), "the read did not finish");
        };
        Volatile.Write(ref holdRead, 1);
        var read = Task.Run(async () =>
        {
            try
            {
                return await Ssd.Read(store, 1);
            }
            finally
            {
                readDone.Set();
            }
        });
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (Volatile.Read(ref holdRead) != 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the read never started");
            await Task.Delay(1);
        }
        await store.DisposeAsync();
        var error = await Xunit.Record.ExceptionAsync(() => read);
        Assert.True(logBytes == store.TombstoneLogBytes, $"a tombstone was appended to the closed log ({logBytes} bytes, then {store.TombstoneLogBytes})");
        Assert.IsType<ObjectDisposedException>(error); // never the block's bytes
    }
}

// A new data segment file's name is durable only once its directory is synced.
public sealed class SsdSegmentCreationTests
{
    // Two writes land in a new data segment. The first creates the file and its directory sync fails (EIO): that write
    // fails. The second was already under way; it finds the file there and must not be acknowledged before a directory
    // sync has succeeded, or a crash can take the file's name, and an acknowledged block, with it.
    [Fact]
    public async Task A_write_into_a_segment_whose_directory_sync_failed_is_acknowledged_only_after_a_sync_succeeds()
    {
        using var dir = new TempDir();
        using var firstFailed = new ManualResetEventSlim();
        int arm = 0, writeCalls = 0, syncs = 0, syncsSucceeded = 0;
        var options = Ssd.Options(dir.Path, compression: false) with
        {
            DataWriteFault = () =>
            {
                // While armed, the first record write (block 100's) waits until the other has failed.
                if (Volatile.Read(ref arm) == 1 && Interlocked.Increment(ref writeCalls) == 1)
                    Assert.True(firstFailed.Wait(TimeSpan.FromSeconds(30)), "the other write never failed");
                return null;
            },
            DirectorySyncFault = () =>
            {
                if (Interlocked.Increment(ref syncs) == 2) // the first is segment 0's; the second is segment 1's, once
                    return "Input/output error (injected EIO)";
                Interlocked.Increment(ref syncsSucceeded);
                return null;
            },
        };
        await using var store = await SsdBlockStore.OpenAsync(options);
        for (int i = 0; i < 60; i++) // 60 records of 68 KiB fill data segment 0 (4 MiB)
            Assert.True(await Ssd.Write(store, i));
        Assert.Equal(1, Volatile.Read(ref syncsSucceeded));
        Volatile.Write(ref arm, 1);
        var second = Task.Run(() => Ssd.Write(store, 100)); // reserves its place in segment 1, then waits
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (Volatile.Read(ref writeCalls) == 0)
        {
            Assert.True(DateTime.UtcNow < deadline, "the second write never started");
            await Task.Delay(1);
        }
        var failure = await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 101)); // creates segment 1; its sync fails
        Assert.Contains("injected EIO", failure.Message);
        firstFailed.Set();
        bool acknowledged;
        try
        {
            acknowledged = await second;
        }
        catch (TierException)
        {
            acknowledged = false;
        }
        Assert.True(!acknowledged || Volatile.Read(ref syncsSucceeded) >= 2,
            "block 100 was acknowledged in a segment file whose directory entry was never synced");
    }
}
