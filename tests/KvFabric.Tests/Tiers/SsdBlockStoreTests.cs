using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

public sealed class SsdBlockStoreTests
{
    [Fact]
    public async Task Blocks_round_trip_and_survive_a_restart_with_their_meta()
    {
        using var dir = new TempDir();
        long used;
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(TierKind.Ssd, store.Kind);
            Assert.Empty(store.Recovered);
            for (int i = 0; i < 20; i++)
                Assert.True(await Ssd.Write(store, i));
            Assert.Equal(20, store.Count);
            for (int i = 0; i < 20; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
            used = store.UsedBytes;
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(20, store.Count);
            Assert.Equal(used, store.UsedBytes);
            Assert.Equal(0, store.RecoveredCorruptRecords);
            var recovered = store.Recovered.ToDictionary(kv => kv.Key, kv => kv.Value);
            for (int i = 0; i < 20; i++)
            {
                Assert.Equal(Ssd.Meta(i), recovered[Ssd.Key(i)]);
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
            }
        }
    }

    [Fact]
    public async Task Default_options_take_a_2_MiB_block()
    {
        using var dir = new TempDir();
        var block = new byte[2 << 20];
        block.AsSpan(0, 4096).Fill(7);
        await using var store = await SsdBlockStore.OpenAsync(new SsdBlockStoreOptions { Directory = dir.Path, CapacityBytes = 64L << 20 });
        Assert.True(await store.WriteAsync(Ssd.Key(1), new BlockMeta(default, 0, block.Length), block));
        var back = new byte[block.Length];
        Assert.True(await store.ReadAsync(Ssd.Key(1), back));
        Assert.Equal(block, back);
        Assert.InRange(store.UsedBytes, 1, block.Length / 8); // mostly zeros: stored compressed
    }

    [Fact]
    public async Task Compressible_blocks_are_stored_smaller_and_noise_is_stored_raw()
    {
        using var dir = new TempDir();
        await using var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path));
        Assert.True(await Ssd.Write(store, 0)); // noise
        Assert.Equal(Ssd.BlockBytes, store.UsedBytes);
        Assert.True(await Ssd.Write(store, 2)); // a 256-byte run repeated
        Assert.InRange(store.UsedBytes - Ssd.BlockBytes, 1, Ssd.BlockBytes / 8);
        Assert.Equal(Ssd.Block(2), await Ssd.Read(store, 2));

        await using var raw = await SsdBlockStore.OpenAsync(Ssd.Options(Path.Combine(dir.Path, "off"), compression: false));
        Assert.True(await Ssd.Write(raw, 2));
        Assert.Equal(Ssd.BlockBytes, raw.UsedBytes);
    }

    [Fact]
    public async Task Capacity_is_exact_and_a_full_store_declines_until_space_is_freed()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, capacity: 3L * Ssd.BlockBytes, compression: false)))
        {
            for (int i = 0; i < 3; i++)
                Assert.True(await Ssd.Write(store, i));
            Assert.Equal(3L * Ssd.BlockBytes, store.UsedBytes);
            Assert.False(await Ssd.Write(store, 3));
            Assert.False(store.Contains(Ssd.Key(3)));
            Assert.True(await Ssd.Write(store, 1)); // already stored: not written twice, no room needed
            Assert.True(store.Remove(Ssd.Key(1)));
            Assert.False(store.Remove(Ssd.Key(1)));
            Assert.Equal(2L * Ssd.BlockBytes, store.UsedBytes);
            Assert.True(await Ssd.Write(store, 3));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, capacity: 3L * Ssd.BlockBytes, compression: false)))
        {
            Assert.Equal(3L * Ssd.BlockBytes, store.UsedBytes);
            Assert.Equal(3, store.Count);
            Assert.Null(await Ssd.Read(store, 1)); // the removal is durable
            Assert.False(await Ssd.Write(store, 4));
        }
    }

    [Fact]
    public async Task Concurrent_writers_each_write_their_own_record_and_every_block_reads_back()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            var writes = Enumerable.Range(0, 64).Select(i => Task.Run(() => Ssd.Write(store, i))).ToArray();
            Assert.All(await Task.WhenAll(writes), Assert.True);
            // The same key from many writers at once: one record, one charge.
            long before = store.UsedBytes;
            var same = Enumerable.Range(0, 8).Select(_ => Task.Run(() => Ssd.Write(store, 100))).ToArray();
            Assert.All(await Task.WhenAll(same), Assert.True);
            Assert.Equal(before + Ssd.BlockBytes, store.UsedBytes);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(65, store.Count);
            foreach (int i in Enumerable.Range(0, 64).Append(100))
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task Bad_input_is_refused_with_what_to_do()
    {
        using var dir = new TempDir();
        var zero = Assert.Throws<ArgumentOutOfRangeException>(() => SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, capacity: 0)).GetAwaiter().GetResult());
        Assert.Contains("CapacityBytes must be positive", zero.Message);

        await using var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path));
        var wrongLength = await Assert.ThrowsAsync<ArgumentException>(async () =>
            await store.WriteAsync(Ssd.Key(1), new BlockMeta(default, 0, 1000), new byte[1000]));
        Assert.Contains("configured for exactly 65536-byte blocks", wrongLength.Message);
        var metaMismatch = await Assert.ThrowsAsync<ArgumentException>(async () =>
            await store.WriteAsync(Ssd.Key(1), new BlockMeta(default, 0, 5), Ssd.Block(1)));
        Assert.Contains("BlockMeta.Length", metaMismatch.Message);
        Assert.True(await Ssd.Write(store, 1));
        var small = await Assert.ThrowsAsync<ArgumentException>(async () => await store.ReadAsync(Ssd.Key(1), new byte[10]));
        Assert.Contains("too small", small.Message);

        var huge = await Assert.ThrowsAsync<TierException>(() => SsdBlockStore.OpenAsync(Ssd.Options(Path.Combine(dir.Path, "huge"), capacity: 1L << 60)));
        Assert.Contains("lower CapacityBytes or free space", huge.Message);

        var second = await Assert.ThrowsAsync<TierException>(() => SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)));
        Assert.Contains("in use by another process", second.Message);
        Assert.Contains(dir.Path, second.Message);
    }

    [Fact]
    public async Task Reopening_with_another_log_geometry_is_refused_before_anything_is_read()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
            Assert.True(await Ssd.Write(store, 0));
        var e = await Assert.ThrowsAsync<TierException>(() => SsdBlockStore.OpenAsync(Ssd.Options(dir.Path) with { LogPageBytes = 2 << 20 }));
        Assert.Contains("different log geometry", e.Message);
        Assert.Contains("log_page_bytes=1048576", e.Message);
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
            Assert.Equal(Ssd.Block(0), await Ssd.Read(store, 0));
    }

    [Fact]
    public async Task A_directory_that_cannot_be_created_is_named_in_the_error()
    {
        using var dir = new TempDir();
        string file = Path.Combine(dir.Path, "a-file");
        await File.WriteAllTextAsync(file, "x");
        var e = await Assert.ThrowsAsync<TierException>(() => SsdBlockStore.OpenAsync(Ssd.Options(Path.Combine(file, "tier"))));
        Assert.Contains(Path.Combine(file, "tier"), e.Message);
        Assert.Contains("cannot be created", e.Message);
    }

    [Fact]
    public async Task A_full_file_system_pauses_writes_and_they_resume_once_space_is_back()
    {
        using var dir = new TempDir();
        bool full = false;
        int deviceWrites = 0;
        var options = Ssd.Options(dir.Path) with
        {
            NoSpaceRetry = TimeSpan.FromMilliseconds(200),
            DataWriteFault = () =>
            {
                Interlocked.Increment(ref deviceWrites);
                return Volatile.Read(ref full) ? "ENOSPC: No space left on device (injected)" : null;
            },
        };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 5; i++)
                Assert.True(await Ssd.Write(store, i));
            Volatile.Write(ref full, true);
            var e = await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 5));
            Assert.Contains("is full", e.Message);
            Assert.Contains("No space left on device", e.Message);
            Assert.Contains("resume", e.Message);
            Assert.Equal(1, store.NoSpaceWrites);

            // During the pause writes are refused without touching the disk.
            int before = Volatile.Read(ref deviceWrites);
            var paused = await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 6));
            Assert.Contains("is full", paused.Message);
            Assert.Equal(before, Volatile.Read(ref deviceWrites));

            // Space comes back: after the pause the next write is tried, and it lands.
            Volatile.Write(ref full, false);
            await Task.Delay(400);
            Assert.True(await Ssd.Write(store, 6));
            Assert.True(await Ssd.Write(store, 5));
            for (int i = 0; i < 7; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(7, store.Count);
            for (int i = 0; i < 7; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task A_failing_device_faults_writes_with_a_clear_error_and_keeps_serving_what_it_has()
    {
        using var dir = new TempDir();
        bool failing = false;
        var options = Ssd.Options(dir.Path) with { DataWriteFault = () => Volatile.Read(ref failing) ? "Input/output error (injected EIO)" : null };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 5; i++)
                Assert.True(await Ssd.Write(store, i));
            Volatile.Write(ref failing, true);
            var e = await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 5));
            Assert.Contains(dir.Path, e.Message);
            Assert.Contains("Input/output error", e.Message);
            Assert.Contains("check the device", e.Message, StringComparison.OrdinalIgnoreCase);
            Assert.False(store.Contains(Ssd.Key(5)));
            Volatile.Write(ref failing, false);
            var again = await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 6));
            Assert.Contains("stopped accepting writes", again.Message);
            for (int i = 0; i < 5; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
            Assert.Equal(5, store.Count);
        }
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(5, store.Count);
            Assert.Null(await Ssd.Read(store, 5));
            for (int i = 0; i < 5; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task After_a_device_fault_removals_start_no_compaction()
    {
        using var dir = new TempDir();
        bool failing = false;
        var options = Ssd.Options(dir.Path, capacity: 1L << 20, compression: false) with
        {
            CompactionSlack = 0.1,
            DataWriteFault = () => Volatile.Read(ref failing) ? "Input/output error (injected EIO)" : null,
        };
        await using var store = await SsdBlockStore.OpenAsync(options);
        // 60 records of 68 KiB fill the first 4 MiB data segment, 8 live at a time: dead bytes pile up, but compaction
        // waits for the tail to leave the segment.
        for (int i = 0; i < 60; i++)
        {
            Assert.True(await Ssd.Write(store, i));
            if (i >= 8)
                Assert.True(store.Remove(Ssd.Key(i - 8)));
        }
        Assert.Equal(0, store.CompactionRuns);
        Volatile.Write(ref failing, true);
        await Assert.ThrowsAsync<TierException>(() => Ssd.Write(store, 60)); // reserved in segment 1, then failed
        Assert.True(store.Remove(Ssd.Key(52))); // compaction is due now, but writes stopped: it must not start (and spin)
        Assert.True(store.Remove(Ssd.Key(53)));
        await Task.Delay(200);
        Assert.Equal(0, store.CompactionRuns);
        Assert.Equal(Ssd.Block(59), await Ssd.Read(store, 59));
    }

    [Fact]
    public async Task Blocks_that_compress_to_little_are_refused_once_their_records_fill_the_disk_reserved()
    {
        using var dir = new TempDir();
        // 1 MiB of capacity, 64 KiB blocks: the disk reserved for records is 1 MiB x (4 KiB + 64 KiB) / 64 KiB. A zero
        // block compresses to a few bytes but its record takes 8 KiB (header sector + one padded payload sector).
        await using var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path, capacity: 1L << 20));
        var zeros = new byte[Ssd.BlockBytes];
        int stored = 0;
        while (stored < 1000 && await store.WriteAsync(Ssd.Key(stored), Ssd.Meta(stored), zeros))
            stored++;
        Assert.InRange(stored, 100, (int)((1L << 20) * (4096 + Ssd.BlockBytes) / Ssd.BlockBytes / 8192));
        Assert.True(store.UsedBytes < (1L << 20) / 8, $"{store.UsedBytes} stored bytes: the disk bound, not the capacity, stopped the writes");
    }

    [Fact]
    public async Task A_device_error_on_the_tombstone_log_faults_writes_and_the_removal_is_not_durable()
    {
        using var dir = new TempDir();
        FaultyDevice? device = null;
        var options = Ssd.Options(dir.Path, device: path => device = new FaultyDevice(Ssd.RealDevice(path)) { ErrorCode = 5 /* EIO */ });
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 5; i++)
                Assert.True(await Ssd.Write(store, i));
            device!.FailWrites = true;
            Assert.True(store.Remove(Ssd.Key(0))); // gone from this process at once; its commit fails
            var deadline = DateTime.UtcNow.AddSeconds(30);
            TierException? refused = null;
            for (int i = 100; refused is null && DateTime.UtcNow < deadline; i++)
            {
                try
                {
                    await Ssd.Write(store, i);
                    await Task.Delay(10);
                }
                catch (TierException e)
                {
                    refused = e;
                }
            }
            Assert.NotNull(refused);
            Assert.Contains("stopped accepting writes", refused.Message);
            Assert.Equal(0, store.NoSpaceLogCommits); // a device error, not a full disk: no pause and retry
            for (int i = 1; i < 5; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
            // A removal after the log's device error is not durable either, and the gauge counts it.
            Assert.True(store.Remove(Ssd.Key(1)));
            Assert.Equal(2, store.RemovalsNotDurable);
            device.FailWrites = false;
        }
        // The tombstones never reached the disk: blocks 0 and 1 are back, intact, as after a crash before a removal's commit.
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            for (int i = 0; i < 5; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task Read_errors_while_opening_are_retried_and_never_cost_a_block()
    {
        using var dir = new TempDir();
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            for (int i = 0; i < 6; i++)
                Assert.True(await Ssd.Write(store, i));
        }

        // Transient: the scan's first read fails twice, and four payload reads fail (several blocks' first attempts, with
        // six verified at once); the retries read every block.
        int scanFailures = 2, failures = 4;
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path) with
        {
            VerifyAllOnOpen = true, // read the payloads (after a clean close the settled mark covers them all)
            DataReadFault = scan => Interlocked.Decrement(ref scan ? ref scanFailures : ref failures) >= 0 ? "injected EIO (transient)" : null,
        }))
        {
            Assert.True(scanFailures < 0 && failures < 0);
            Assert.Equal((0, (string?)null), store.RecoveredUnreadable);
            Assert.Equal(0, store.RecoveredCorruptRecords);
            Assert.Equal(6, store.Count);
            for (int i = 0; i < 6; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }

        // Lasting, on the payloads: the blocks are counted, named, and kept (not dropped as corrupt); reading one fails
        // with the device's error until the device recovers, then it is read and verified.
        bool failing = true;
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path) with
        {
            VerifyAllOnOpen = true,
            DataReadFault = scan => !scan && Volatile.Read(ref failing) ? "injected EIO (lasting)" : null,
        }))
        {
            Assert.Equal(6, store.RecoveredUnreadable.Blocks);
            Assert.Contains("injected EIO (lasting)", store.RecoveredUnreadable.FirstError);
            Assert.Contains("data address", store.RecoveredUnreadable.FirstError);
            Assert.Equal(0, store.RecoveredCorruptRecords);
            Assert.Equal(6, store.Count);
            Assert.Equal(6, store.Recovered.Count);
            var e = await Assert.ThrowsAsync<TierException>(() => Ssd.Read(store, 2));
            Assert.Contains("stays indexed", e.Message);
            Volatile.Write(ref failing, false);
            for (int i = 0; i < 6; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }

        // Lasting, on the scan: the segments cannot be searched for blocks, so opening fails, naming the file, and changes
        // nothing; the next open reads every block.
        var refused = await Assert.ThrowsAsync<TierException>(() => SsdBlockStore.OpenAsync(Ssd.Options(dir.Path) with
        {
            DataReadFault = scan => scan ? "injected EIO (lasting scan)" : null,
        }));
        Assert.Contains("blocks.data.0", refused.Message);
        Assert.Contains("Nothing was changed on disk", refused.Message);
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(6, store.Count);
            for (int i = 0; i < 6; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task A_device_failing_under_concurrent_writers_loses_no_acknowledged_block()
    {
        using var dir = new TempDir();
        bool failing = false;
        int failed = 0;
        var acknowledged = new System.Collections.Concurrent.ConcurrentBag<int>();
        var options = Ssd.Options(dir.Path) with
        {
            DataWriteFault = () =>
            {
                if (!Volatile.Read(ref failing))
                    return null;
                Interlocked.Increment(ref failed);
                return "Input/output error (injected EIO)";
            },
        };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            int next = -1;
            var writers = Enumerable.Range(0, 16).Select(_ => Task.Run(async () =>
            {
                int i;
                while ((i = Interlocked.Increment(ref next)) < 400)
                {
                    if (i == 120)
                        Volatile.Write(ref failing, true); // mid-stream, with writes in flight
                    try
                    {
                        if (await Ssd.Write(store, i))
                            acknowledged.Add(i);
                    }
                    catch (TierException)
                    {
                    }
                }
            })).ToArray();
            await Task.WhenAll(writers).WaitAsync(TimeSpan.FromSeconds(120)); // every write finishes: none hangs on the failure
            Assert.True(Volatile.Read(ref failed) > 0);
        }
        Assert.NotEmpty(acknowledged);
        await using (var store = await SsdBlockStore.OpenAsync(Ssd.Options(dir.Path)))
        {
            Assert.Equal(0, store.RecoveredCorruptRecords);
            foreach (int i in acknowledged)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }

    [Fact]
    public async Task Compaction_frees_old_segments_and_keeps_every_live_block()
    {
        using var dir = new TempDir();
        // Capacity 2 MiB, slack 0.5: churn through 6x the capacity; the log must stay bounded and live blocks intact.
        var options = Ssd.Options(dir.Path, capacity: 2L << 20, compression: false) with { CompactionSlack = 0.5 };
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            for (int i = 0; i < 192; i++)
            {
                Assert.True(await Ssd.Write(store, i));
                if (i >= 16)
                    Assert.True(store.Remove(Ssd.Key(i - 16)));
            }
            await store.WaitForCompactionAsync();
            Assert.True(store.CompactedSegments > 0, $"no segment compacted; log holds {store.LogBytes} bytes");
            Assert.InRange(store.LogBytes, 0, 3 * (2L << 20) + options.SegmentBytes + options.LogPageBytes);
            for (int i = 176; i < 192; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
        await using (var store = await SsdBlockStore.OpenAsync(options))
        {
            Assert.Equal(16, store.Count);
            for (int i = 176; i < 192; i++)
                Assert.Equal(Ssd.Block(i), await Ssd.Read(store, i));
        }
    }
}
