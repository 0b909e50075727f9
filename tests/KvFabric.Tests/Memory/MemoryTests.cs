using KvFabric.Memory;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Memory;

public sealed class MemoryTests
{
    [Fact]
    public void The_pool_accounts_for_every_slot_and_refuses_double_or_foreign_returns()
    {
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 5000, SlotCount = 10, MaxRegionBytes = 3 * 8192 });
        Assert.Equal(4, pool.Regions.Count); // 3 slots of 8192 bytes per region
        var rented = new List<BlockSlot>();
        for (int i = 0; i < 10; i++)
            rented.Add(pool.Rent());
        Assert.Equal(10, pool.InUse);
        Assert.Equal(0, pool.Available);
        Assert.False(pool.TryRent(out _));
        Assert.Contains("exhausted", Assert.Throws<InvalidOperationException>(() => pool.Rent()).Message);
        Assert.Equal(10, rented.Select(s => s.Address).Distinct().Count());
        Assert.All(rented, s => Assert.Equal(0, s.Address % 4096));
        Assert.All(rented, s => Assert.Equal(5000, s.Length));

        pool.Return(rented[3]);
        Assert.Contains("twice", Assert.Throws<InvalidOperationException>(() => pool.Return(rented[3])).Message);
        Assert.Throws<ArgumentException>(() => pool.Return(new BlockSlot(2, rented[2].Address + 64, 5000)));
        Assert.Throws<ArgumentException>(() => pool.Return(new BlockSlot(99, 0, 5000)));
        Assert.Equal(9, pool.InUse);
        foreach (var s in rented.Where((_, i) => i != 3))
            pool.Return(s);
        Assert.Equal(0, pool.InUse);
        Assert.Equal(10, pool.HighWater);
    }

    [Fact]
    public void Slots_do_not_overlap_and_keep_their_bytes()
    {
        using var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 3000, SlotCount = 16, Alignment = 64 });
        for (int i = 0; i < 16; i++)
            DataPattern.Fill(pool.SlotAt(i).AsSpan(), (ulong)i, 0);
        for (int i = 0; i < 16; i++)
            Assert.Equal(-1, DataPattern.FindMismatch(pool.SlotAt(i).AsSpan(), (ulong)i, 0));
    }

    [Fact]
    public void Bad_pool_options_are_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 0, SlotCount = 1 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 1, SlotCount = 0 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 1, SlotCount = 1, Alignment = 100 }));
        Assert.Throws<ArgumentOutOfRangeException>(() => new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 8192, SlotCount = 1, MaxRegionBytes = 4096 }));
    }

    [Fact]
    public void A_shared_pool_is_visible_through_a_second_mapping_and_removed_on_dispose()
    {
        string path;
        using (var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 4096, SlotCount = 4, Shared = true, Tag = "test" }))
        {
            var region = pool.Regions[0];
            path = region.MappedPath!;
            Assert.StartsWith($"/dev/shm/kvfabric-{Environment.ProcessId}-test-", path);
            DataPattern.Fill(pool.SlotAt(2).AsSpan(), 42, 0);
            using var view = SharedMemorySegment.Open(path, region.Length);
            Assert.Equal(-1, DataPattern.FindMismatch(view.GetSpan(2 * 4096, 4096), 42, 0));
            view.GetSpan(0, 1)[0] = 0xAB;
            Assert.Equal(0xAB, pool.SlotAt(0).AsSpan()[0]);
            Assert.Contains("the peer's metadata says", Assert.Throws<IOException>(() => SharedMemorySegment.Open(path, region.Length + 1)).Message);
        }
        Assert.False(File.Exists(path));
        Assert.Throws<FileNotFoundException>(() => SharedMemorySegment.Open(path, 4096));
        Assert.Throws<ArgumentException>(() => SharedMemorySegment.Open("/etc/passwd", 1));
    }

    [Fact]
    public void Segments_of_dead_processes_are_cleaned_and_live_ones_kept()
    {
        // pid 2^22+1 is above Linux's pid_max ceiling, so it cannot be alive.
        string stale = $"/dev/shm/kvfabric-4194305-test-{Guid.NewGuid():N}";
        File.WriteAllBytes(stale, new byte[16]);
        using var live = SharedMemorySegment.Create(4096, "live");
        SharedMemorySegment.RemoveStale(); // agents started by parallel tests may have removed it first
        Assert.False(File.Exists(stale));
        Assert.True(File.Exists(live.MappedPath));
    }

    [Fact]
    public void A_mapped_file_region_persists_its_bytes()
    {
        string path = Path.Combine(Path.GetTempPath(), $"kvfabric-file-{Guid.NewGuid():N}.bin");
        try
        {
            using (var file = MappedMemory.Create(path, 8192, MemoryKind.File, unlinkOnDispose: false))
            {
                DataPattern.Fill(file.GetSpan(0, 8192), 5, 0);
                file.Flush();
            }
            byte[] bytes = File.ReadAllBytes(path);
            Assert.Equal(-1, DataPattern.FindMismatch(bytes, 5, 0));
            Assert.Contains("cannot create", Assert.Throws<IOException>(() => MappedMemory.Create(path, 8192, MemoryKind.File, false)).Message);
        }
        finally
        {
            File.Delete(path);
        }
    }

    [Fact]
    public void Anonymous_memory_grows_in_place_or_moves_keeping_its_bytes_and_zeroing_the_new_ones()
    {
        using var memory = new AnonymousMemory(5000);
        for (int i = 0; i < 5000; i++)
            memory.GetSpan(i, 1)[0] = (byte)(i * 7);
        memory.Grow(3L << 20);
        Assert.Equal(3L << 20, memory.Length);
        for (int i = 0; i < 5000; i++)
            Assert.Equal((byte)(i * 7), memory.GetSpan(i, 1)[0]);
        Assert.True(memory.GetSpan(5000, (3 << 20) - 5000).IndexOfAnyExcept((byte)0) < 0);
        memory.GetSpan((3 << 20) - 1, 1)[0] = 1; // the whole new length is writable
        Assert.Throws<ArgumentOutOfRangeException>(() => memory.Grow(3L << 20));
    }

    [Fact]
    public void A_pool_with_its_own_allocator_carves_its_slots_from_what_the_allocator_gives()
    {
        var given = new List<AnonymousMemory>();
        INativeMemory Allocate(long bytes)
        {
            var m = new AnonymousMemory(bytes);
            given.Add(m);
            return m;
        }
        using (var pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 5000, SlotCount = 6, MaxRegionBytes = 3 * 8192, Allocator = Allocate }))
        {
            Assert.Equal(2, given.Count);                     // 6 slots of 8 KiB stride, 3 per region
            Assert.Equal(given, pool.Regions);
            Assert.Equal(given[1].Address + 8192, pool.SlotAt(4).Address);
        }
        Assert.All(given, m => Assert.Throws<ObjectDisposedException>(() => m.Address)); // the pool disposed them

        Assert.Throws<ArgumentException>(() => new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 64, SlotCount = 1, Shared = true, Allocator = Allocate }));
        using var small = new AnonymousMemory(4096);
        var e = Assert.Throws<ArgumentException>(() => new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 8192, SlotCount = 1, Allocator = _ => small }));
        Assert.Contains("needs 8192 bytes", e.Message, StringComparison.Ordinal);
        Assert.Throws<ObjectDisposedException>(() => small.Address); // what the pool cannot use is given back
    }
}
