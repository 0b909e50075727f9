using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>
/// The call shapes and protocol features no kvfabric.v1 method needs today (bidirectional streaming, custom metadata)
/// and the propagation of cancellation to a handler, through test-only methods added to a real sidecar's router.
/// HealthCheckRequest/Response serve as ready-made messages.
/// </summary>
public sealed class CallShapeTests : IAsyncLifetime
{
    private const string Echo = "/kvfabric.test.Probe/Echo";
    private const string Hang = "/kvfabric.test.Probe/Hang";
    private SidecarHost _host = null!;
    private readonly TaskCompletionSource<bool> _hangCancelled = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly TaskCompletionSource _hangEntered = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public async Task InitializeAsync()
    {
        _host = new SidecarHost(new SidecarOptions
        {
            Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20, StagingSlots = 1,
        }, NullLoggerFactory.Instance);
        // Echo: bidirectional; answers each request as it arrives, prefixed by the x-echo-prefix request header.
        _host.Router.Bidirectional(Echo, async call =>
        {
            string prefix = call.RequestHeaders["x-echo-prefix"].ToString();
            while (await call.ReadAsync(HealthCheckRequest.Parser) is { } request)
                await call.WriteAsync(new HealthCheckRequest { Service = prefix + request.Service });
        });
        _host.Router.Unary<HealthCheckRequest, HealthCheckResponse>(Hang, HealthCheckRequest.Parser, async (_, call) =>
        {
            _hangEntered.TrySetResult();
            try
            {
                await Task.Delay(Timeout.Infinite, call.CancellationToken);
            }
            catch (OperationCanceledException)
            {
                _hangCancelled.TrySetResult(true);
                throw;
            }

            return new HealthCheckResponse();
        });
        await _host.StartAsync();
    }

    public async Task DisposeAsync() => await _host.DisposeAsync();

    private RpcChannel Channel() => new(new RpcChannelOptions { Address = new Uri($"http://{_host.GrpcEndpoint}"), Tenant = "dev", Token = "dev" });

    [Fact]
    public async Task Bidirectional_calls_interleave_requests_and_responses_and_carry_custom_metadata()
    {
        using var channel = Channel();
        await using var call = channel.Streaming<HealthCheckRequest, HealthCheckRequest>(Echo, HealthCheckRequest.Parser,
            new CallOptions(Metadata: [new("x-echo-prefix", "echo:")]));
        for (int i = 0; i < 5; i++)
        {
            await call.WriteAsync(new HealthCheckRequest { Service = $"m{i}" });
            HealthCheckRequest? reply = await call.ReadAsync(); // each answer arrives before the next request is sent
            Assert.Equal($"echo:m{i}", reply?.Service);
        }

        await call.CompleteAsync();
        Assert.Null(await call.ReadAsync());
    }

    [Fact]
    public async Task Client_cancellation_reaches_the_handler()
    {
        using var channel = Channel();
        using var cts = new CancellationTokenSource();
        Task<HealthCheckResponse> pending = channel.UnaryAsync(Hang, new HealthCheckRequest(), HealthCheckResponse.Parser,
            new CallOptions(CancellationToken: cts.Token));
        await _hangEntered.Task.WaitAsync(TimeSpan.FromSeconds(30)); // the handler is running: now cancel
        await cts.CancelAsync();
        Assert.Equal(StatusCode.Cancelled, (await Assert.ThrowsAsync<RpcException>(() => pending)).Status);
        Assert.True(await _hangCancelled.Task.WaitAsync(TimeSpan.FromSeconds(10)), "the handler's token was not cancelled");
    }
}
