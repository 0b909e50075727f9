using KvFabric.Tiers.Ssd;
using Xunit;

namespace KvFabric.Tests.Tiers;

public sealed class SsdSlotFileTests
{
    private const uint Magic = 0x54534554; // "TEST"

    // A crash while the write of version 2 extended the file: the slot's bytes reached the disk, the file's size only
    // part of the way. Opening still reads version 2 as the newest; it must not zero it on disk to preallocate the slot,
    // or the next write (over the older slot, version 1) is the only version on disk, and a crash tearing it leaves none.
    [Fact]
    public void Opening_a_short_file_never_overwrites_a_slot_that_reads_valid()
    {
        using var dir = new TempDir();
        string path = Path.Combine(dir.Path, "test.slots");
        using (var file = new SsdSlotFile(path, Magic))
        {
            file.Write(1, [1]);
            file.Write(2, [2]);
        }
        using (var f = new FileStream(path, FileMode.Open))
            f.SetLength(SsdSlotFile.SlotBytes + 512);
        using (var file = new SsdSlotFile(path, Magic))
        {
            Assert.Equal([2L, 1L], file.Slots.Select(s => s.Number));
            file.Write(3, [3]); // over the older slot
        }
        using (var f = new FileStream(path, FileMode.Open)) // ... which a crash tore
            f.Write(new byte[512]);
        using (var file = new SsdSlotFile(path, Magic))
            Assert.Equal(2L, Assert.Single(file.Slots).Number);
    }
}
