using System.Diagnostics;
using System.Net;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>
/// A node that is shutting down refuses connections (its listener closed at SIGTERM), or answers UNAVAILABLE a call that
/// raced its GOAWAY: FabricClient retries idempotent calls refused either way only within the call's deadline, with a
/// growing backoff, never in a tight loop.
/// </summary>
public sealed class StoppingNodeRetryTests
{
    private sealed class CountingHandler() : DelegatingHandler(new SocketsHttpHandler())
    {
        public int Attempts;

        protected override Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            Interlocked.Increment(ref Attempts);
            return base.SendAsync(request, cancellationToken);
        }
    }

    [Fact]
    public async Task An_idempotent_call_the_node_answered_unavailable_is_retried_and_others_are_not()
    {
        const string Flaky = "/kvfabric.test.Probe/Flaky";
        int calls = 0;
        await using var host = new KvFabric.Sidecar.SidecarHost(new KvFabric.Sidecar.SidecarOptions
        {
            Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20, StagingSlots = 1,
        }, Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance);
        // Answers UNAVAILABLE (headers and status, no message) to every other call, as a node refusing work does.
        host.Router.Unary<Grpc.Health.V1.HealthCheckRequest, Grpc.Health.V1.HealthCheckResponse>(Flaky, Grpc.Health.V1.HealthCheckRequest.Parser, (_, _) =>
            Interlocked.Increment(ref calls) % 2 == 1
                ? throw new RpcException(StatusCode.Unavailable, "node n is shutting down and takes no new calls; retry on another node")
                : Task.FromResult(new Grpc.Health.V1.HealthCheckResponse()));
        await host.StartAsync();
        using var channel = new RpcChannel(new RpcChannelOptions { Address = new Uri($"http://{host.GrpcEndpoint}"), Tenant = "dev", Token = "dev", RetryBackoff = TimeSpan.FromMilliseconds(1) });

        await channel.UnaryAsync(Flaky, new Grpc.Health.V1.HealthCheckRequest(), Grpc.Health.V1.HealthCheckResponse.Parser, idempotent: true);
        Assert.Equal(2, calls); // refused, then served

        var e = await Assert.ThrowsAsync<RpcException>(() =>
            channel.UnaryAsync(Flaky, new Grpc.Health.V1.HealthCheckRequest(), Grpc.Health.V1.HealthCheckResponse.Parser, idempotent: false));
        Assert.Equal(StatusCode.Unavailable, e.Status);
        Assert.Equal(3, calls); // not idempotent: tried once
    }

    [Fact]
    public void A_backoff_that_would_spin_is_refused_when_the_channel_is_made()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => new RpcChannel(new RpcChannelOptions
        {
            Address = new Uri("http://127.0.0.1:1"), MaxRetries = 1000, RetryBackoff = TimeSpan.Zero,
        }));
        Assert.Contains("RetryBackoff must be at least 1 ms", e.Message, StringComparison.Ordinal);
        using var noRetries = new RpcChannel(new RpcChannelOptions { Address = new Uri("http://127.0.0.1:1"), MaxRetries = 0, RetryBackoff = TimeSpan.Zero });
    }

    [Fact]
    public async Task A_refused_idempotent_call_is_retried_within_its_deadline_and_does_not_spin()
    {
        var listener = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop(); // a stopped node: connections are refused at once
        using var handler = new CountingHandler();
        using var client = new FabricClient(new RpcChannelOptions
        {
            Address = new Uri($"http://127.0.0.1:{port}"), Tenant = "t", Token = "t", Handler = handler,
            MaxRetries = 1000, RetryBackoff = TimeSpan.FromMilliseconds(20),
        });
        var clock = Stopwatch.StartNew();
        var e = await Assert.ThrowsAsync<RpcException>(() => client.LookupAsync(new byte[16], new CallOptions(Deadline: TimeSpan.FromSeconds(1))));
        Assert.Equal(StatusCode.Unavailable, e.Status);
        // 20, 40, 80, 160, 320 ms: the next wait would pass the deadline, so the call gives up before it.
        Assert.InRange(handler.Attempts, 2, 8);
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(3), $"took {clock.Elapsed}");

        using var notIdempotent = new FabricClient(new RpcChannelOptions { Address = new Uri($"http://127.0.0.1:{port}"), Tenant = "t", Token = "t", Handler = handler });
        int before = handler.Attempts;
        await Assert.ThrowsAsync<RpcException>(() => notIdempotent.ReserveAsync(1, options: new CallOptions(Deadline: TimeSpan.FromSeconds(1))));
        Assert.Equal(before + 1, handler.Attempts);
    }
}
