using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// The settled mark: the data address below which every record was written whole. Opening verifies only the payloads at
// or above it. Blocks are 64 KiB noise stored raw: each record spans 4 KiB of header sector + 64 KiB of payload.
public sealed class SsdSettledMarkTests
{
    private const int Record = 4096 + Ssd.BlockBytes;

    private static SsdBlockStoreOptions Options(string dir) =>
        Ssd.Options(dir, compression: false) with { SettledMarkInterval = TimeSpan.FromMilliseconds(20) };

    private static async Task WaitForMarkAsync(SsdBlockStore store, long below)
    {
        var deadline = DateTime.UtcNow.AddSeconds(30);
        while (store.MarkedBelow < below)
        {
            Assert.True(DateTime.UtcNow < deadline, $"the settled mark stayed at {store.MarkedBelow}, below {below}, for 30 s");
            await Task.Delay(10);
        }
    }

    // The last 32 KiB of the record at this index never reached the disk (preallocated space reads as zeros).
    private static void TearLastHalf(string dir, int record)
    {
        using var f = new FileStream(Path.Combine(dir, "blocks.data.0"), FileMode.Open, FileAccess.Write);
        f.Position = (long)record * Record + Record - (32 << 10);
        f.Write(new byte[32 << 10]);
    }

    [Fact]
    public async Task After_a_clean_close_opening_reads_no_payload_and_without_a_mark_it_verifies_every_one()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 16; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(0, store.RecoveredVerifiedPayloads);
            Assert.Equal(16L * Record, store.MarkedBelow);
            Assert.Equal(16, store.Count);
            for (int i = 0; i < 16; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        Ssd.ForgetSettledMark(dir.Path);
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(16, store.RecoveredVerifiedPayloads);
            Assert.Equal(16, store.Count);
        }
    }

    [Fact]
    public async Task The_mark_follows_acknowledged_writes_while_the_store_is_open()
    {
        using var dir = new TempDir();
        await using var store = await SsdBlockStore.OpenAsync(Options(dir.Path));
        for (int i = 0; i < 8; i++)
            Assert.True(await Ssd.Write(store, i));
        await WaitForMarkAsync(store, 8L * Record);
        await Task.WhenAll(Enumerable.Range(8, 8).Select(i => Ssd.Write(store, i)));
        await WaitForMarkAsync(store, 16L * Record);
        Assert.Equal(16L * Record, store.MarkedBelow);
    }

    // A record whose write failed after it was issued may be partly on disk: the mark never passes it, not while the
    // store is open, and not at its close.
    [Fact]
    public async Task A_write_that_failed_holds_the_mark_below_its_record()
    {
        using var dir = new TempDir();
        string? fault = null;
        var options = Options(dir.Path) with { DataWriteFault = () => Volatile.Read(ref fault) };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 4; i++)
                Assert.True(await Ssd.Write(store, i));
            await WaitForMarkAsync(store, 4L * Record);
            Volatile.Write(ref fault, "injected EIO");
            await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 4));
            await Task.Delay(200); // ten intervals: the mark must not move
            Assert.Equal(4L * Record, store.MarkedBelow);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(4L * Record, store.MarkedBelow);
            Assert.Equal(4, store.Count);
            Assert.True(await Ssd.Write(store, 4)); // placed past the mark and the failed record's place
            for (int i = 0; i < 5; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    // A record found torn at one open keeps its sealed header on disk; the mark then moves past it. Opening unseals it, so
    // that the next open, which takes records below the mark from their headers, does not bring it back.
    [Fact]
    public async Task A_record_found_torn_does_not_come_back_once_the_mark_covers_it()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        TearLastHalf(dir.Path, 3);
        Ssd.ForgetSettledMark(dir.Path); // a crash before any mark covered it
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(1, store.RecoveredIncompleteWrites);
            Assert.Equal(7, store.Count);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(8L * Record, store.MarkedBelow);
            Assert.Equal(0, store.RecoveredVerifiedPayloads);
            Assert.False(store.Contains(Ssd.Key(3)));
            Assert.Equal(7, store.Count);
            Assert.True(await Ssd.Write(store, 3));
            for (int i = 0; i < 8; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    // A v3 directory (the same records, no mark) or a v4 one (no tombstone sectors) is upgraded in place to v5, so that a
    // v3 binary, which would place records below a mark it does not know, or a v4 one, which would skip tombstone sectors,
    // refuses it afterwards; older formats are still refused.
    [Fact]
    public async Task V3_and_v4_directories_are_upgraded_in_place_and_older_formats_are_refused()
    {
        using var dir = new TempDir();
        string format = Path.Combine(dir.Path, "kvfabric-ssd.format");
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 4; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        Assert.StartsWith("kvfabric-ssd-log v5\n", File.ReadAllText(format), StringComparison.Ordinal);
        File.WriteAllText(format, File.ReadAllText(format).Replace("kvfabric-ssd-log v5", "kvfabric-ssd-log v3", StringComparison.Ordinal));
        Ssd.ForgetSettledMark(dir.Path); // a v3 binary wrote none
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(4, store.RecoveredVerifiedPayloads);
            for (int i = 0; i < 4; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        Assert.StartsWith("kvfabric-ssd-log v5\n", File.ReadAllText(format), StringComparison.Ordinal);

        File.WriteAllText(format, File.ReadAllText(format).Replace("kvfabric-ssd-log v5", "kvfabric-ssd-log v4", StringComparison.Ordinal));
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 4; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        Assert.StartsWith("kvfabric-ssd-log v5\n", File.ReadAllText(format), StringComparison.Ordinal);

        File.WriteAllText(format, File.ReadAllText(format).Replace("kvfabric-ssd-log v5", "kvfabric-ssd-log v2", StringComparison.Ordinal));
        var e = await Assert.ThrowsAsync<TierException>(() => SsdBlockStore.OpenAsync(Options(dir.Path)));
        Assert.Contains("kvfabric-ssd-log v2", e.Message);
        Assert.Contains("move the directory aside", e.Message);
    }

    // The mark is sealed with the directory's store key: one copied from another store is not believed, and a torn record
    // it would have covered is still found torn.
    [Fact]
    public async Task A_mark_from_another_store_is_ignored()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        foreach (string dir in new[] { a.Path, b.Path })
        {
            await using var store = await SsdBlockStore.OpenAsync(Options(dir));
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        TearLastHalf(a.Path, 3);
        File.Copy(Path.Combine(b.Path, "settled.slots"), Path.Combine(a.Path, "settled.slots"), overwrite: true);
        await using (var store = await SsdBlockStore.OpenAsync(Options(a.Path)))
        {
            Assert.Equal(0, store.MarkedBelow);
            Assert.Equal(8, store.RecoveredVerifiedPayloads);
            Assert.Equal(1, store.RecoveredIncompleteWrites);
            Assert.Equal(7, store.Count);
        }
    }

    // The foreign mark's slot numbers are higher than any this store has written: the store's own marks must still become
    // the newest, or every later open ignores them and reads every payload again.
    [Fact]
    public async Task After_a_foreign_mark_was_ignored_the_stores_own_mark_is_used_at_the_next_open()
    {
        using var a = new TempDir();
        using var b = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(b.Path)))
        {
            for (int i = 0; i < 8; i++)
            {
                Assert.True(await Ssd.Write(store, i));
                await WaitForMarkAsync(store, (i + 1L) * Record); // one mark per write: b's slot numbers run ahead of a's
            }
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(a.Path)))
        {
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        File.Copy(Path.Combine(b.Path, "settled.slots"), Path.Combine(a.Path, "settled.slots"), overwrite: true);
        await using (var store = await SsdBlockStore.OpenAsync(Options(a.Path)))
            Assert.Equal(8, store.RecoveredVerifiedPayloads); // the foreign mark is not trusted; the clean close writes a's own
        for (int open = 0; open < 2; open++)
        {
            await using var store = await SsdBlockStore.OpenAsync(Options(a.Path));
            Assert.Equal(8L * Record, store.MarkedBelow);
            Assert.Equal(0, store.RecoveredVerifiedPayloads);
            Assert.Equal(8, store.Count);
        }
    }

    // Compaction's copy of block 3 was torn by a crash (the original is intact). At the next open the device fails the
    // copy's payload reads (transient): the copy stays indexed, unverified. The mark must not pass it: an open after
    // that would take it from its sealed header, shadow the intact original, and the read would find it corrupt.
    [Fact]
    public async Task A_copy_left_unverified_at_open_holds_the_mark_below_it()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        Ssd.PlaceTornCopy(dir.Path, 3L * Record, 8L * Record, Record, 4096 + (32 << 10)); // above the mark (8 records)
        bool failing = true;
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path) with
        {
            DataReadFault = scan => !scan && Volatile.Read(ref failing) ? "injected EIO (transient)" : null,
        }))
        {
            Assert.Equal(1, store.RecoveredUnreadable.Blocks);
            Assert.Equal(8, store.Count);
            Volatile.Write(ref failing, false); // the device is fine again; block 3 is not read in this run
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(8, store.Count);
            for (int i = 0; i < 8; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    // Unsealing a record found torn can fail (a device error): the mark then stays below it for the whole run, so that the
    // next open verifies it again instead of taking it from its header.
    [Fact]
    public async Task A_torn_record_that_could_not_be_unsealed_holds_the_mark_below_it()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        Ssd.PlaceTornCopy(dir.Path, 3L * Record, 8L * Record, Record, 4096 + (32 << 10));
        bool failing = true;
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path) with
        {
            DataWriteFault = () => Volatile.Read(ref failing) ? "injected EIO" : null,
        }))
        {
            Assert.Equal(1, store.RecoveredIncompleteWrites);
            Volatile.Write(ref failing, false);
            Assert.True(await Ssd.Write(store, 8)); // past the torn copy
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(8L * Record, store.MarkedBelow);
            Assert.Equal(1, store.RecoveredIncompleteWrites); // found again, and unsealed this time
            Assert.Equal(9, store.Count);
            for (int i = 0; i < 9; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(0, store.RecoveredIncompleteWrites);
            Assert.Equal(9, store.Count);
            for (int i = 0; i < 9; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    // A scrub (VerifyAllOnOpen) finds a copy below the mark corrupt, and its unsealing fails: the mark moves down below
    // it, so that the next open, without a scrub, verifies it again instead of trusting its header.
    [Fact]
    public async Task A_corrupt_copy_below_the_mark_that_could_not_be_unsealed_lowers_the_mark()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        await using (var f = new FileStream(Path.Combine(dir.Path, "blocks.data.0"), FileMode.Open, FileAccess.ReadWrite))
        {
            f.Position = 2L * Record + 4096 + 100; // a bit flipped at rest in block 2's payload
            int b = f.ReadByte();
            f.Position--;
            f.WriteByte((byte)(b ^ 0x01));
        }
        bool failing = true;
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path) with
        {
            VerifyAllOnOpen = true,
            DataWriteFault = () => Volatile.Read(ref failing) ? "injected EIO" : null,
        }))
        {
            Assert.Equal(1, store.RecoveredCorruptRecords);
            Volatile.Write(ref failing, false);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Options(dir.Path)))
        {
            Assert.Equal(2L * Record, store.MarkedBelow);
            Assert.Equal(1, store.RecoveredCorruptRecords); // verified again (and unsealed this time), not trusted
            Assert.False(store.Contains(Ssd.Key(2)));
            Assert.Equal(7, store.Count);
        }
    }

    // A full disk only pauses writes now, so a write that failed on ENOSPC must hold the mark only until compaction
    // retires its segment, not for the rest of the process (every later crash would verify everything written since).
    [Fact]
    public async Task A_write_that_found_the_disk_full_holds_the_mark_only_until_its_segment_is_retired()
    {
        using var dir = new TempDir();
        bool full = false;
        var options = Options(dir.Path) with
        {
            CapacityBytes = 32L << 20,
            CompactionSlack = 0.1,
            NoSpaceRetry = TimeSpan.FromMilliseconds(1),
            DataWriteFault = () => Volatile.Read(ref full) ? "ENOSPC: No space left on device (injected)" : null,
        };
        const int PerSegment = (4 << 20) / Record; // records in one 4 MiB data segment
        await using var store = await SsdBlockStore.OpenAsync(options);
        for (int i = 0; i < 10; i++)
            Assert.True(await Ssd.Write(store, i));
        Volatile.Write(ref full, true);
        await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 10)); // the record at index 10 may be torn
        Volatile.Write(ref full, false);
        await Task.Delay(20);
        for (int i = 11; i < 3 * PerSegment; i++)
            Assert.True(await Ssd.Write(store, i));
        await Task.Delay(200);
        Assert.True(store.MarkedBelow <= 10L * Record, $"the mark passed a record whose write failed: {store.MarkedBelow}");

        // Remove everything in the first segment: compaction retires it, and the failed record with it.
        for (int i = 0; i < PerSegment + 1; i++)
        {
            if (i != 10)
                store.Remove(Ssd.Key(i));
        }

        await store.WaitForCompactionAsync();
        Assert.True(store.CompactedSegments > 0, "compaction retired no segment");
        await WaitForMarkAsync(store, 4L << 20);
    }
}
