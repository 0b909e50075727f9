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
