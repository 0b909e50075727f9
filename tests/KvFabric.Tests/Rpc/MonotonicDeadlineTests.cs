using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>A clock whose wall time can be stepped (as NTP or an operator does) while its monotonic timestamp runs on.</summary>
internal sealed class SteppedClock : TimeProvider
{
    private long _stepTicks;

    public void StepWallClock(TimeSpan by) => Interlocked.Add(ref _stepTicks, by.Ticks);

    public override DateTimeOffset GetUtcNow() => base.GetUtcNow() + TimeSpan.FromTicks(Interlocked.Read(ref _stepTicks));
}

/// <summary>Deadlines are measured on a monotonic clock, on the server.</summary>
public sealed class MonotonicDeadlineTests
{
    private const string Probe = "/kvfabric.test.Probe/";

    private static async Task<HttpContext> DispatchAsync(GrpcDispatcher dispatcher, string method, string timeout, CancellationTokenSource aborted)
    {
        var http = new DefaultHttpContext { RequestAborted = aborted.Token };
        http.Request.Method = "POST";
        http.Request.ContentType = GrpcProtocol.ContentType;
        http.Request.Path = method;
        http.Request.Headers[GrpcProtocol.TimeoutHeader] = timeout;
        http.Request.Body = new MemoryStream(GrpcFraming.ToFrame(new HealthCheckRequest()));
        http.Response.Body = new MemoryStream();
        await dispatcher.HandleAsync(http);
        return http;
    }

    [Fact]
    public async Task A_wall_clock_step_does_not_change_the_time_a_server_call_has_left()
    {
        var clock = new SteppedClock();
        TimeSpan? left = null;
        var router = new GrpcRouter();
        router.Unary<HealthCheckRequest, HealthCheckResponse>(Probe + "Budget", HealthCheckRequest.Parser, (_, call) =>
        {
            clock.StepWallClock(TimeSpan.FromHours(1)); // NTP steps the wall clock forward an hour mid-call
            left = call.TimeLeft;
            return Task.FromResult(new HealthCheckResponse());
        }, authenticated: false);
        var dispatcher = new GrpcDispatcher(router, new TenantRegistry([new TenantConfig("alpha", "alpha-token")]), new MetricsRegistry(),
            NullLogger.Instance, 1 << 20) { Time = clock };
        using var aborted = new CancellationTokenSource();
        HttpContext http = await DispatchAsync(dispatcher, Probe + "Budget", "10M", aborted);
        Assert.Equal("0", http.Response.Headers[GrpcProtocol.StatusHeader].ToString());
        // Ten minutes minus the moments the call took; a wall-clock reading would say the deadline passed 50 minutes ago.
        Assert.NotNull(left);
        Assert.True(left > TimeSpan.FromMinutes(5), $"time left {left}");
    }

    [Fact]
    public async Task A_client_reset_after_the_deadline_is_deadline_exceeded_even_when_the_wall_clock_stepped_back()
    {
        var clock = new SteppedClock();
        var metrics = new MetricsRegistry();
        using var aborted = new CancellationTokenSource();
        var router = new GrpcRouter();
        router.Unary<HealthCheckRequest, HealthCheckResponse>(Probe + "Reset", HealthCheckRequest.Parser, async (_, call) =>
        {
            clock.StepWallClock(TimeSpan.FromHours(-1)); // the wall clock steps back an hour
            try
            {
                await Task.Delay(Timeout.Infinite, call.CancellationToken); // until the 100 ms deadline passes
            }
            catch (OperationCanceledException)
            {
            }

            await Task.Delay(50); // a timer may fire a tick early: be clearly past the deadline
            // The client gave up at its deadline too and reset the stream: the call breaks on its next write.
            await aborted.CancelAsync();
            throw new IOException("the client reset the stream");
        }, authenticated: false);
        var dispatcher = new GrpcDispatcher(router, new TenantRegistry([new TenantConfig("alpha", "alpha-token")]), metrics,
            NullLogger.Instance, 1 << 20) { Time = clock };
        await DispatchAsync(dispatcher, Probe + "Reset", "100m", aborted);
        string text = metrics.Render();
        Assert.Contains($"kvfabric_rpc_calls_total{{method=\"{Probe}Reset\",code=\"DeadlineExceeded\"}} 1", text, StringComparison.Ordinal);
    }
}
