using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>Regressions for the review of the gRPC server and client.</summary>
public sealed class RpcReviewFixTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [Fact]
    public async Task A_deadline_too_long_for_a_timer_is_no_local_deadline()
    {
        using var client = fx.Client();
        // TimeSpan.MaxValue is a common way to say "no deadline"; timers hold at most ~49 days.
        Assert.Equal("node-a", (await client.StatsAsync(new CallOptions(Deadline: TimeSpan.MaxValue))).Node);
        await using var watch = client.WatchHealth(options: new CallOptions(Deadline: TimeSpan.FromDays(100)));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await watch.ReadAsync())?.Status);
    }

    [Fact]
    public async Task A_deadline_that_already_passed_is_deadline_exceeded()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("passed-deadline", 1);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 1));
        // A caller that computes what is left of its own budget can get a negative remainder.
        var e = await Assert.ThrowsAsync<RpcException>(() => client.GetAsync(TestBlocks.Packed(chain), new byte[fx.BlockBytes], fx.BlockBytes,
            options: new CallOptions(Deadline: TimeSpan.FromSeconds(-1))));
        Assert.Equal(StatusCode.DeadlineExceeded, e.Status);
        await using var watch = client.WatchHealth(options: new CallOptions(Deadline: TimeSpan.FromMilliseconds(-5)));
        Assert.Equal(StatusCode.DeadlineExceeded, (await Assert.ThrowsAsync<RpcException>(async () => await watch.ReadAsync())).Status);
    }
}
