using System.Globalization;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

// Recovery finds blocks by scanning the data segments for sealed records; these tests damage records on disk the way a
// crash or a hostile tenant could and check what the scan makes of them. Blocks are 64 KiB noise, stored raw, so the
// first record sits at data address 0 and each record spans 4 KiB of header sector + 64 KiB of payload.
public sealed class SsdRecoveryScanTests
{
    private const int Record = 4096 + Ssd.BlockBytes;

    private static async Task<string> WriteBlocksAsync(string dir, int count)
    {
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir, compression: false)))
        {
            for (int i = 0; i < count; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        return Path.Combine(dir, "blocks.data.0");
    }

    private static void Overwrite(string file, long offset, ReadOnlySpan<byte> bytes)
    {
        using var f = new FileStream(file, FileMode.Open, FileAccess.Write);
        f.Position = offset;
        f.Write(bytes);
    }

    [Fact]
    public async Task A_record_whose_payload_was_not_fully_written_is_skipped_as_incomplete_and_the_blocks_after_it_are_found()
    {
        using var dir = new TempDir();
        string segment = await WriteBlocksAsync(dir.Path, 8);
        // Block 3's last 32 KiB never reached the disk: preallocated space reads as zeros. Its write was under way at the
        // crash, so no settled mark covers it.
        Overwrite(segment, 3L * Record + Record - (32 << 10), new byte[32 << 10]);
        Ssd.ForgetSettledMark(dir.Path);
        await using var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, compression: false));
        Assert.Equal(1, store.RecoveredIncompleteWrites);
        Assert.Equal(0, store.RecoveredCorruptRecords);
        Assert.Equal(8, store.RecoveredVerifiedPayloads);
        Assert.False(store.Contains(Ssd.Key(3)));
        Assert.Equal(7, store.Count);
        foreach (int i in new[] { 0, 1, 2, 4, 5, 6, 7 })
            Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
    }

    [Fact]
    public async Task A_torn_header_sector_hides_only_its_own_block_and_new_writes_go_past_everything_found()
    {
        using var dir = new TempDir();
        string segment = await WriteBlocksAsync(dir.Path, 8);
        Overwrite(segment, 3L * Record, new byte[4096]); // block 3's header sector is gone: the scan searches on to block 4
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, compression: false)))
        {
            Assert.False(store.Contains(Ssd.Key(3)));
            Assert.Equal(7, store.Count);
            Assert.True(await Ssd.Write(store, 3)); // written again, after block 7, not over block 4
            for (int i = 0; i < 8; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, compression: false)))
        {
            Assert.Equal(8, store.Count);
            Assert.Equal(0, store.RecoveredCorruptRecords + store.RecoveredIncompleteWrites);
            for (int i = 0; i < 8; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task A_record_forged_inside_a_payload_is_accepted_only_when_sealed_with_the_stores_key(bool withStoreKey)
    {
        using var dir = new TempDir();
        string segment = await WriteBlocksAsync(dir.Path, 2);
        // A tenant's block 0 whose payload carries, 4 KiB in, a complete record for someone else's key at the data
        // address it would have there (8192); then block 0's own header sector is torn, so the scan steps into its payload.
        var forgedKey = Ssd.Key(999);
        var forgedPayload = Ssd.Block(999).AsSpan(0, 4096).ToArray();
        var forged = new byte[4096 + 4096];
        new SsdRecordHeader(SsdRecordKind.Block, SsdCodec.None, forgedKey, new KvFabric.Tiers.BlockMeta(default, 0, 4096), 4096).Write(forged, forgedPayload);
        ulong key = withStoreKey ? Ssd.StoreKey(dir.Path) : 0;
        SsdRecordHeader.SealSector(forged.AsSpan(0, 4096), 8192, key);
        forgedPayload.CopyTo(forged, 4096);
        Overwrite(segment, 8192, forged);
        Overwrite(segment, 0, new byte[4096]);

        await using var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, compression: false) with { BlockBytes = 0 });
        Assert.Equal(withStoreKey, store.Contains(forgedKey)); // with the key the scan does find it there: the test reaches the forgery
        Assert.False(store.Contains(Ssd.Key(0)));
        Assert.Equal(Ssd.Block(1), await Ssd.Read(store, 1));
    }
}

public sealed class SsdSegmentReuseTests
{
    [Fact]
    public async Task Compacted_segments_are_reused_and_the_records_left_in_them_never_come_back()
    {
        using var dir = new TempDir();
        var options = Ssd.Options(dir.Path, capacity: 32L << 20, compression: false) with { CompactionSlack = 0.05 };
        int CountSpares() => Directory.EnumerateFiles(dir.Path, "blocks.data.spare.*").Count();
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 200; i++)
                Assert.True(await Ssd.Write(store, i)); // 4 MiB segments of 60 records: segments 0-3
            for (int i = 0; i < 120; i++)
                Assert.True(store.Remove(Ssd.Key(i))); // segments 0 and 1 hold nothing live
            await store.WaitForCompactionAsync();
            Assert.True(store.CompactedSegments >= 2, $"{store.CompactedSegments} segments compacted");
            int spares = CountSpares();
            Assert.True(spares >= 2, $"{spares} spare segment files after compaction");
            Assert.False(File.Exists(Path.Combine(dir.Path, "blocks.data.0")));
            for (int i = 200; i < 400; i++)
                Assert.True(await Ssd.Write(store, i)); // new segments take the spares
            Assert.True(CountSpares() < spares, "new segments did not reuse the spare files");
        }
        // The reused files still hold the removed blocks' old records, sealed for their old data addresses: none is found.
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            Assert.Equal(0, store.RecoveredCorruptRecords + store.RecoveredIncompleteWrites);
            Assert.Equal(280, store.Count);
            for (int i = 0; i < 120; i++)
                Assert.False(store.Contains(Ssd.Key(i)), $"removed block {i} came back from a reused segment file");
            for (int i = 120; i < 400; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task A_spare_is_never_reused_at_its_old_place_where_its_records_would_be_valid_again()
    {
        using var dir = new TempDir();
        var options = SsdCompactionRaceTestsOptions(dir.Path);
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 4; i++) // two records per 16 KiB segment: 0 and 1 in segment 0, 2 and 3 in segment 1
                Assert.True(await store.WriteAsync(SsdWriterTool.KeyOf(i), SsdWriterTool.MetaOf(i, 4096), Block4k(i)));
        }
        // Segment 1 retired as a spare with its tombstones gone from the log (simulated: renamed, never removed), so the
        // tail restarts at segment 1 while spare.1 still holds records sealed for exactly those addresses.
        File.Move(Path.Combine(dir.Path, "blocks.data.1"), Path.Combine(dir.Path, "blocks.data.spare.1"));
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            Assert.Equal(2, store.Count);
            Assert.True(await store.WriteAsync(SsdWriterTool.KeyOf(7), SsdWriterTool.MetaOf(7, 4096), Block4k(7))); // creates segment 1
        }
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            Assert.False(store.Contains(SsdWriterTool.KeyOf(3)), "a record left in a spare came back: the spare became its own segment again");
            Assert.False(store.Contains(SsdWriterTool.KeyOf(2)));
            Assert.Equal(3, store.Count);
            foreach (int i in new[] { 0, 1, 7 })
            {
                var buffer = new byte[4096];
                Assert.True(await store.ReadAsync(SsdWriterTool.KeyOf(i), buffer));
                Assert.Equal(Block4k(i), buffer);
            }
        }
    }

    private static SsdBlockStoreOptions SsdCompactionRaceTestsOptions(string dir) => new()
    {
        Directory = dir,
        CapacityBytes = 4 << 20,
        BlockBytes = 4096,
        MaxBlockBytes = 4096,
        Compression = false,
        LogPageBytes = 16 << 10,
        SegmentBytes = 16 << 10,
        CompactionSlack = 100,
    };

    private static byte[] Block4k(int i)
    {
        var b = new byte[4096];
        SsdWriterTool.Fill(i, b);
        return b;
    }
}
