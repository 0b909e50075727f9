using System.Security.Cryptography;
using KvFabric.Memory;
using Xunit;

namespace KvFabric.Tests.Memory;

/// <summary>Stale-segment cleanup removes what no live process holds, and nothing else.</summary>
public sealed class StaleSegmentReviewTests
{
    // A pid no process here can have (pid_max is at most 2^22): what a live agent's pid in another PID namespace
    // (a container sharing /dev/shm, as pods with a memory-backed /dev/shm do) looks like from this one.
    private static string ForeignPath() =>
        $"{SharedMemorySegment.Directory}/kvfabric-{int.MaxValue}-review-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8))}";

    [Fact]
    public void A_live_segment_whose_owner_pid_is_not_visible_here_is_not_removed()
    {
        string path = ForeignPath();
        using var live = MappedMemory.Create(path, 4096, MemoryKind.SharedHost, unlinkOnDispose: true);
        live.GetSpan(0, 1)[0] = 0x5A;

        SharedMemorySegment.RemoveStale();

        Assert.True(File.Exists(path), "cleanup removed a segment its owner still has mapped");
    }

    [Fact]
    public void A_segment_nobody_holds_is_removed_when_its_pid_is_gone()
    {
        string path = ForeignPath();
        File.WriteAllBytes(path, new byte[4096]);
        try
        {
            SharedMemorySegment.RemoveStale();

            Assert.False(File.Exists(path));
        }
        finally
        {
            File.Delete(path);
        }
    }
}
