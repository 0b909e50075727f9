using System.Diagnostics;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// The disk the SSD tier takes stays within what OpenAsync checked was free, under churn too.
public sealed class SsdFootprintTests
{
    private const int SegmentBytes = 1 << 20;

    private static long DataFilesBytes(string dir) =>
        Directory.EnumerateFiles(dir, "blocks.data.*").Sum(f => new FileInfo(f).Length);

    // Compaction cannot free anything (its reads fail) while blocks are written and removed: dead records pile up. The
    // store must refuse writes once they pass the slack and a segment, not grow its segments past the disk it reserved
    // (on a file system sized to that reserve, compaction would then have no room left to copy into, and writes would
    // stop for good). Once compaction can read again, it frees the dead segments and writes are taken again.
    [Fact]
    public async Task Writes_are_refused_rather_than_outgrow_the_reserved_disk_while_compaction_is_behind()
    {
        using var dir = new TempDir();
        bool failReads = true;
        var options = Ssd.Options(dir.Path, capacity: 1L << 20, compression: false) with
        {
            SegmentBytes = SegmentBytes,
            DataReadFault = scan => !scan && Volatile.Read(ref failReads) ? "Input/output error (injected EIO)" : null,
        };
        long bound = SsdBlockStore.DataSpanLimit(options) + 2L * SegmentBytes; // + compaction's copies, the preallocated tail
        Assert.True(bound + 3L * SegmentBytes <= SsdBlockStore.FootprintBytes(options));
        await using var store = await SsdBlockStore.OpenAsync(options);
        // Blocks that stay, in the oldest segment: compaction must read them to free it.
        const int Kept = 4, Live = 8;
        for (int i = 0; i < Kept; i++)
            Assert.True(await Ssd.Write(store, 500 + i));
        int refused = 0;
        for (int i = 0; i < 200; i++)
        {
            if (!await Ssd.Write(store, i))
                refused++;
            if (i >= Live)
                store.Remove(Ssd.Key(i - Live));
            long onDisk = DataFilesBytes(dir.Path);
            Assert.True(onDisk <= bound, $"after {i + 1} writes the data segments take {onDisk} bytes, past the {bound} the store reserved");
        }
        Assert.True(refused > 100, $"only {refused} of 200 writes refused");
        Assert.Equal(refused, store.WritesRefusedCompactionBehind);
        Assert.NotNull(store.LastCompactionError);
        Assert.False(store.WritesStopped); // a read error does not stop writes; the refusals are backpressure only

        Volatile.Write(ref failReads, false);
        var clock = Stopwatch.StartNew();
        int next = 1000;
        while (!await Ssd.Write(store, next))
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), "writes were not taken again after compaction could read");
            await store.WaitForCompactionAsync();
            await Task.Delay(5);
        }
        Assert.Equal(Ssd.Block(next), await Ssd.Read(store, next));
        for (int i = 0; i < Kept; i++)
            Assert.Equal(Ssd.Block(500 + i), await Ssd.Read(store, 500 + i));
        Assert.True(store.CompactedSegments > 0);
        Assert.True(DataFilesBytes(dir.Path) <= bound);
    }
}
