using KvFabric.Transfer;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>Unloading a peer waits for its posts in flight, woken by the last one leaving (no polling), and refuses new ones.</summary>
public sealed class RemoteDrainTests
{
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task Draining_a_remote_returns_when_its_last_post_exits_and_refuses_new_posts()
    {
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "initiator" });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target" });
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        Assert.True(remote.TryEnterPost());
        Assert.True(remote.TryEnterPost());

        var drain = remote.DrainAsync(Generous);
        Assert.False(remote.TryEnterPost()); // unloading: no new posts
        remote.ExitPost();
        Assert.False(drain.IsCompleted);
        remote.ExitPost();
        await drain.WaitAsync(Generous);

        // Bounded: a post that never exits does not hold the drain past its timeout.
        var stuck = await initiator.LoadRemoteAsync(target.ExportMetadata());
        Assert.True(stuck.TryEnterPost());
        await stuck.DrainAsync(TimeSpan.FromMilliseconds(50)).WaitAsync(Generous);
        stuck.ExitPost();
    }
}
