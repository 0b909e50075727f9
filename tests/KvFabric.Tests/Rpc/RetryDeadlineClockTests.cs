using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>A unary call's retries share its deadline, measured on a monotonic clock.</summary>
public sealed class RetryDeadlineClockTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    /// <summary>Fails the first send (a refused connection) after the wall clock stepped forward an hour.</summary>
    private sealed class StepThenFailHandler(SteppedClock clock) : DelegatingHandler(new SocketsHttpHandler())
    {
        public int Attempts;

        protected override Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            if (Interlocked.Increment(ref Attempts) > 1)
                return base.SendAsync(request, cancellationToken);
            clock.StepWallClock(TimeSpan.FromHours(1));
            return Task.FromException<HttpResponseMessage>(new HttpRequestException("connection refused (injected)"));
        }
    }

    [Fact]
    public async Task A_wall_clock_step_does_not_use_up_a_retried_calls_deadline()
    {
        var clock = new SteppedClock();
        using var handler = new StepThenFailHandler(clock);
        using var channel = new RpcChannel(new RpcChannelOptions
        {
            Address = new Uri(fx.Address), Tenant = "alpha", Token = "alpha-token", Handler = handler, RetryBackoff = TimeSpan.FromMilliseconds(1),
        }) { Time = clock };
        LookupResponse r = await channel.UnaryAsync("/kvfabric.v1.Fabric/Lookup",
            new LookupRequest { Hashes = ByteString.CopyFrom(TestBlocks.Packed(TestBlocks.Chain("clock-step", 1))) }, LookupResponse.Parser,
            new CallOptions(Deadline: TimeSpan.FromSeconds(20)), idempotent: true);
        Assert.Equal(0u, r.MatchedBlocks);
        Assert.Equal(2, handler.Attempts);
    }

    [Theory]
    [InlineData(50, 0, 50)]
    [InlineData(50, 3, 400)]
    [InlineData(50, 31, 30_000)]        // 1 << 31 overflowed to a negative delay
    [InlineData(50, 1000, 30_000)]
    [InlineData(86_400_000, 1, 30_000)] // a day, doubled: more than the cap, never more than Task.Delay takes
    public void Retry_delays_double_and_stay_under_the_cap(double backoffMs, int attempt, double expectedMs) =>
        Assert.Equal(TimeSpan.FromMilliseconds(expectedMs), RpcChannel.RetryDelay(TimeSpan.FromMilliseconds(backoffMs), attempt));
}
