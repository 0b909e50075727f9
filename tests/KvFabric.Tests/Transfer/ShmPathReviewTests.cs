using System.Security.Cryptography;
using KvFabric.Memory;
using KvFabric.Transfer;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>A peer's segment path names a file directly in /dev/shm; a directory planted there leads nowhere.</summary>
public sealed class ShmPathReviewTests
{
    [Fact]
    public async Task A_segment_path_through_a_planted_directory_link_is_never_mapped()
    {
        // Anyone can create entries in /dev/shm: here a kvfabric-* link to a directory holding someone's file.
        string dir = Directory.CreateTempSubdirectory("kvfabric-victim-").FullName;
        string link = $"{SharedMemorySegment.Directory}/kvfabric-{int.MaxValue}-link-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8))}";
        string victim = Path.Combine(dir, "victim.bin");
        File.WriteAllBytes(victim, new byte[4096]);
        Directory.CreateSymbolicLink(link, dir);
        try
        {
            await using var peer = new TransferAgent(new TransferAgentOptions { Name = "peer" });
            using var peerMemory = new AnonymousMemory(4096);
            peer.Register(peerMemory);
            var md = peer.GetMetadata();
            // Metadata (forged, or of a peer that was tricked) naming a "segment" behind the link.
            md = md with { Regions = [md.Regions[0] with { Kind = MemoryKind.SharedHost, Length = 4096, MappedPath = link + "/victim.bin" }] };
            await using var agent = new TransferAgent(new TransferAgentOptions { Name = "initiator" });
            using var local = new AnonymousMemory(4096);
            local.GetSpan(0, 4096).Fill(0xAB);
            agent.Register(local);
            var remote = await agent.LoadRemoteAsync(md.ToBytes());

            var request = agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(local.Address, 4096)], remote,
                [new MemoryDescriptor(md.Regions[0].Address, 4096)], new TransferOptions { Deadline = TimeSpan.FromSeconds(30) });
            await agent.PostAsync(request);

            Assert.All(File.ReadAllBytes(victim), b => Assert.Equal(0, b));
        }
        finally
        {
            File.Delete(link);
            Directory.Delete(dir, recursive: true);
        }
    }
}
