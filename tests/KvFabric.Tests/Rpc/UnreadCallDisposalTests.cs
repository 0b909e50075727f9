using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>A streaming call disposed before it read anything must end the server's call.</summary>
public sealed class UnreadCallDisposalTests : IAsyncLifetime
{
    private const string Stream = "/kvfabric.test.Probe/Stream";
    private SidecarHost _host = null!;
    private readonly TaskCompletionSource _entered = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _cancelled = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public async Task InitializeAsync()
    {
        _host = new SidecarHost(new SidecarOptions
        {
            Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20, StagingSlots = 1,
        }, NullLoggerFactory.Instance);
        // Stream: sends one message (so the response headers go out), then holds the call (as a Get holds its blocks).
        _host.Router.ServerStreaming<HealthCheckRequest>(Stream, HealthCheckRequest.Parser, async (_, call) =>
        {
            await call.WriteAsync(new HealthCheckResponse { Status = HealthCheckResponse.Types.ServingStatus.Serving });
            _entered.TrySetResult();
            try
            {
                await Task.Delay(Timeout.Infinite, call.CancellationToken);
            }
            catch (OperationCanceledException)
            {
                _cancelled.TrySetResult();
                throw;
            }
        }, authenticated: false);
        await _host.StartAsync();
    }

    public async Task DisposeAsync() => await _host.DisposeAsync();

    /// <summary>Says when the response headers of a call arrived.</summary>
    private sealed class HeadersSignal() : DelegatingHandler(new SocketsHttpHandler())
    {
        public readonly TaskCompletionSource Arrived = new(TaskCreationOptions.RunContinuationsAsynchronously);

        protected override async Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            HttpResponseMessage response = await base.SendAsync(request, cancellationToken);
            Arrived.TrySetResult();
            return response;
        }
    }

    [Fact]
    public async Task A_server_streaming_call_disposed_unread_ends_the_servers_call()
    {
        using var signal = new HeadersSignal();
        using var channel = new RpcChannel(new RpcChannelOptions { Address = new Uri($"http://{_host.GrpcEndpoint}"), Handler = signal });
        var call = channel.ServerStreaming(Stream, new HealthCheckRequest(), HealthCheckResponse.Parser,
            new CallOptions(Deadline: Timeout.InfiniteTimeSpan));
        await _entered.Task.WaitAsync(TimeSpan.FromSeconds(30));
        await signal.Arrived.Task.WaitAsync(TimeSpan.FromSeconds(30)); // the response started; the caller changes its mind
        await call.DisposeAsync();
        // The server must see the stream reset; a call left open would hold what it holds until the connection closes.
        await _cancelled.Task.WaitAsync(TimeSpan.FromSeconds(30));
    }

    [Fact]
    public async Task Cancelling_a_streaming_call_between_reads_ends_the_servers_call_before_it_is_disposed()
    {
        using var channel = new RpcChannel(new RpcChannelOptions { Address = new Uri($"http://{_host.GrpcEndpoint}") });
        using var cts = new CancellationTokenSource();
        var call = channel.ServerStreaming(Stream, new HealthCheckRequest(), HealthCheckResponse.Parser,
            new CallOptions(Deadline: Timeout.InfiniteTimeSpan, CancellationToken: cts.Token));
        Assert.NotNull(await call.ReadAsync()); // the response started; no read is waiting when the caller cancels
        await cts.CancelAsync();
        await _cancelled.Task.WaitAsync(TimeSpan.FromSeconds(30));
        var e = await Assert.ThrowsAsync<RpcException>(async () => await call.ReadAsync());
        Assert.Equal(StatusCode.Cancelled, e.Status);
        await call.DisposeAsync();
        await call.DisposeAsync(); // a second dispose is a no-op
    }
}

