using System.Diagnostics;
using System.Net;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>
/// A node that is shutting down refuses connections (its listener closed at SIGTERM): FabricClient retries idempotent
/// calls refused that way only within the call's deadline, with a growing backoff, never in a tight loop.
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
