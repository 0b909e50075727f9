using System.Diagnostics;
using System.Globalization;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Tiers;

// Crash safety across processes: a child (`kvfabric ssd-writer`) writes pattern blocks and prints DURABLE i for each write the
// store acknowledged; the test SIGKILLs it mid-stream, reopens the directory and checks every acknowledged block, byte-exact.
public sealed class SsdCrashTests
{
    // The geometry the child uses (its --capacity-mib default is 1024).
    private static SsdBlockStoreOptions WriterOptions(string dir) => SsdWriterTool.Options(dir, Ssd.BlockBytes, 1024L << 20);

    private static Process StartWriter(string dir, int first, int blocks)
    {
        var psi = new ProcessStartInfo("dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        foreach (string a in new[] { TransferPeerProcess.DefaultDll, "ssd-writer", "--dir", dir, "--first", first.ToString(CultureInfo.InvariantCulture),
                     "--blocks", blocks.ToString(CultureInfo.InvariantCulture), "--block-bytes", Ssd.BlockBytes.ToString(CultureInfo.InvariantCulture), "--concurrency", "4" })
            psi.ArgumentList.Add(a);
        return Process.Start(psi) ?? throw new InvalidOperationException("could not start 'dotnet' for the ssd-writer child");
    }

    // Reads lines until `stopAfter` DURABLE lines arrived, then kills the child with SIGKILL (no chance to flush or close).
    private static async Task<HashSet<int>> RunAndKillAsync(string dir, int first, int blocks, int stopAfter)
    {
        using var child = StartWriter(dir, first, blocks);
        var durable = new HashSet<int>();
        try
        {
            while (durable.Count < stopAfter)
            {
                string? line = await child.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(60));
                if (line is null)
                    Assert.Fail($"ssd-writer ended before {stopAfter} durable blocks: {await child.StandardError.ReadToEndAsync()}");
                if (line.StartsWith("DURABLE ", StringComparison.Ordinal))
                    durable.Add(int.Parse(line.AsSpan(8), CultureInfo.InvariantCulture));
            }
        }
        finally
        {
            child.Kill(entireProcessTree: true); // SIGKILL
            await child.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30));
        }
        // Lines already in the pipe were acknowledged before the kill as well.
        string rest = await child.StandardOutput.ReadToEndAsync();
        foreach (string line in rest.Split('\n', StringSplitOptions.RemoveEmptyEntries))
        {
            if (line.StartsWith("DURABLE ", StringComparison.Ordinal))
                durable.Add(int.Parse(line.AsSpan(8), CultureInfo.InvariantCulture));
        }
        return durable;
    }

    private static async Task AssertOnlyIntactBlocksAsync(SsdBlockStore store, ISet<int> mustHave, int upTo)
    {
        var buffer = new byte[Ssd.BlockBytes];
        for (int i = 0; i < upTo; i++)
        {
            bool found = await store.ReadAsync(Ssd.Key(i), buffer); // a corrupt record would throw here: never served
            if (mustHave.Contains(i))
                Assert.True(found, $"block {i} was acknowledged as durable but is absent after the crash");
            if (found)
                Assert.Equal(Ssd.Block(i), buffer);
        }
    }

    [Fact]
    public async Task Every_block_acknowledged_before_a_SIGKILL_reads_back_byte_exact()
    {
        using var dir = new TempDir();
        var durable = await RunAndKillAsync(dir.Path, first: 0, blocks: 100_000, stopAfter: 150);
        await using (var store = await SsdBlockStore.OpenAsync(WriterOptions(dir.Path)))
        {
            Assert.Equal(0, store.RecoveredCorruptRecords);
            Assert.True(store.Count >= durable.Count, $"{store.Count} blocks recovered, {durable.Count} acknowledged");
            await AssertOnlyIntactBlocksAsync(store, durable, durable.Max() + 64);
            var recovered = store.Recovered.ToDictionary(kv => kv.Key, kv => kv.Value);
            foreach (int i in durable)
                Assert.Equal(Ssd.Meta(i), recovered[Ssd.Key(i)]);
        }

        // A second crash on top of the recovered log: both generations survive.
        var more = await RunAndKillAsync(dir.Path, first: 200_000, blocks: 100_000, stopAfter: 100);
        await using (var store = await SsdBlockStore.OpenAsync(WriterOptions(dir.Path)))
        {
            Assert.Equal(0, store.RecoveredCorruptRecords);
            // The first generation lies below the settled mark the clean close above left: none of it is read again.
            Assert.True(store.RecoveredVerifiedPayloads <= store.Count - durable.Count,
                $"{store.RecoveredVerifiedPayloads} payloads verified at open, but only {store.Count - durable.Count} blocks are the second writer's");
            var buffer = new byte[Ssd.BlockBytes];
            foreach (int i in durable.Concat(more))
            {
                Assert.True(await store.ReadAsync(Ssd.Key(i), buffer), $"acknowledged block {i} lost after the second crash");
                Assert.Equal(Ssd.Block(i), buffer);
            }
        }
    }

    // Bit rot at rest in a record the settled mark covers (written whole): opening trusts its sealed header and the read
    // catches it; a scrub at open (VerifyAllOnOpen) catches it there.
    [Theory]
    [InlineData(true)]
    [InlineData(false)]
    public async Task A_flipped_byte_in_a_record_is_detected_and_never_served(bool verifyAllOnOpen)
    {
        using var dir = new TempDir();
        var options = Ssd.Options(dir.Path, compression: false) with { VerifyAllOnOpen = verifyAllOnOpen };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 8; i++)
                Assert.True(await Ssd.Write(store, i));
        }
        // Uncompressed noise blocks: find block 3's payload in the data segment by content and flip one byte in its middle.
        string segment = Path.Combine(dir.Path, "blocks.data.0");
        byte[] file = await File.ReadAllBytesAsync(segment);
        int at = file.AsSpan().IndexOf(Ssd.Block(3).AsSpan(0, 4096));
        Assert.True(at >= 0, "block 3's payload was not found in the data segment");
        await using (var f = new FileStream(segment, FileMode.Open, FileAccess.Write))
        {
            f.Position = at + Ssd.BlockBytes / 2;
            f.WriteByte((byte)(file[at + Ssd.BlockBytes / 2] ^ 0x10));
        }

        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            if (verifyAllOnOpen)
            {
                // Detected while reopening: the record is skipped, the block is absent, the others are intact.
                Assert.Equal(8, store.RecoveredVerifiedPayloads);
                Assert.Equal(1, store.RecoveredCorruptRecords);
                Assert.False(store.Contains(Ssd.Key(3)));
                Assert.DoesNotContain(store.Recovered, kv => kv.Key == Ssd.Key(3));
            }
            else
            {
                // Detected by the read, which drops it: the bytes are never served.
                Assert.Equal(0, store.RecoveredVerifiedPayloads);
                Assert.Equal(8, store.Count);
                var e = await Assert.ThrowsAsync<BlockCorruptException>(() => Ssd.Read(store, 3));
                Assert.Contains("checksum", e.Message);
                Assert.False(store.Contains(Ssd.Key(3)));
            }
            Assert.Null(await Ssd.Read(store, 3));
            foreach (int i in new[] { 0, 1, 2, 4, 5, 6, 7 })
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task A_record_corrupted_while_the_store_is_open_is_dropped_on_read()
    {
        using var dir = new TempDir();
        var options = Ssd.Options(dir.Path, compression: false);
        await using var store = await SsdBlockStore.OpenAsync(options);
        for (int i = 0; i < 64; i++)
            Assert.True(await Ssd.Write(store, i));
        string segment = Path.Combine(dir.Path, "blocks.data.0");
        byte[] file = await File.ReadAllBytesAsync(segment);
        int at = file.AsSpan().IndexOf(Ssd.Block(0).AsSpan(0, 4096));
        Assert.True(at >= 0, "block 0's payload was not found in the data segment");
        await using (var f = new FileStream(segment, FileMode.Open, FileAccess.Write, FileShare.ReadWrite))
        {
            f.Position = at + 100;
            f.WriteByte((byte)(file[at + 100] ^ 0xFF));
        }
        var e = await Assert.ThrowsAsync<BlockCorruptException>(() => Ssd.Read(store, 0));
        Assert.Equal(Ssd.Key(0), e.Key);
        Assert.Equal(TierKind.Ssd, e.Tier);
        Assert.Contains("checksum", e.Message);
        Assert.False(store.Contains(Ssd.Key(0)));
        Assert.Equal(63L * Ssd.BlockBytes, store.UsedBytes);
        Assert.Null(await Ssd.Read(store, 0));
    }
}
