using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using KvFabric.Tests.Rpc;
using Xunit;
using static Grpc.Health.V1.HealthCheckResponse.Types;

namespace KvFabric.Tests.Sidecar;

/// <summary>grpc.health.v1 Watch as load balancers use it.</summary>
public sealed class SidecarHealthTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [Fact]
    public async Task Watch_sends_the_current_status_then_each_change_and_ends_when_the_client_cancels()
    {
        const string Service = "test.health.Watched";
        fx.Host.Health.Set(Service, ServingStatus.Serving);
        using var client = fx.Client();
        using var cts = new CancellationTokenSource();
        var watch = client.WatchHealth(Service, new CallOptions(CancellationToken: cts.Token)); // disposed below, once
        Assert.Equal(ServingStatus.Serving, (await watch.ReadAsync())?.Status);
        fx.Host.Health.Set(Service, ServingStatus.NotServing);
        Assert.Equal(ServingStatus.NotServing, (await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);
        fx.Host.Health.Set(Service, ServingStatus.Serving);
        Assert.Equal(ServingStatus.Serving, (await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);

        // An unknown service: SERVICE_UNKNOWN, and the stream stays open for when it appears.
        await using var unknown = client.WatchHealth("test.health.NotYet");
        Assert.Equal(ServingStatus.ServiceUnknown, (await unknown.ReadAsync())?.Status);
        fx.Host.Health.Set("test.health.NotYet", ServingStatus.Serving);
        Assert.Equal(ServingStatus.Serving, (await unknown.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);

        // The server's handler ends when the client cancels the call (counted as Cancelled).
        var calls = fx.Host.Metrics.CreateCounter("kvfabric_rpc_calls_total", string.Empty, "method", "code");
        double before = calls.Get("/grpc.health.v1.Health/Watch", "Cancelled");
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<Exception>(async () => await watch.ReadAsync());
        await watch.DisposeAsync(); // cancelling already reset the stream; disposing is still the caller's part
        for (int i = 0; i < 300 && calls.Get("/grpc.health.v1.Health/Watch", "Cancelled") <= before; i++)
            await Task.Delay(100);
        Assert.True(calls.Get("/grpc.health.v1.Health/Watch", "Cancelled") > before, "the Watch handler did not end after the client cancelled: "
            + string.Join(" | ", fx.Host.Metrics.Render().Split('\n').Where(l => l.Contains("Watch", StringComparison.Ordinal) && !l.Contains("bucket", StringComparison.Ordinal))));
    }
}
