using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>A READ that asked for a checksum is verified, whatever the target chose to send.</summary>
public sealed class TcpChecksumReviewTests
{
    private const int Chunk = 4096;
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task A_read_data_reply_without_the_requested_checksum_does_not_count_as_verified()
    {
        await using var fake = new FakeTcpTarget();
        var (agent, local, remote, _, owner, target) = await TcpStripeReviewTests.SetUpAsync(fake);
        await using var _a = agent;
        await using var _o = owner;
        using var _l = local;
        using var _t = target;
        var request = agent.Prepare(TransferOp.Read, [MemoryDescriptor.Of(local.Address, Chunk)], remote, [MemoryDescriptor.Of(target.Address, Chunk)],
            new TransferOptions { Backend = BackendKind.Tcp, Streams = 1, Checksum = ChecksumKind.Crc32C, Deadline = Bound });

        var post = agent.PostAsync(request);
        var conn = await fake.AcceptAsync();
        var asked = await FakeTcpTarget.ReadAsync(conn);
        Assert.True(asked.HasChecksum);
        // The reply carries the bytes but no checksum flag: nothing vouches for them.
        await FakeTcpTarget.ReadDataAsync(conn, asked, 0x77);
        var result = await post.WaitAsync(Bound);

        Assert.False(result.IsSuccess, result.ToString());
        Assert.Equal(DescriptorStatus.ChecksumMismatch, request.GetStatus(0));
    }
}
