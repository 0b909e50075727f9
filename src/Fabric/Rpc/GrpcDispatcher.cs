using KvFabric.Client.Grpc;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging;

namespace KvFabric.Rpc;

/// <summary>
/// Turns an HTTP/2 request into a gRPC call: checks the protocol, authenticates, applies grpc-timeout, runs the handler,
/// and always ends with grpc-status/grpc-message (in headers for a trailers-only response, else in trailers). A handler
/// that throws never drops the stream: RpcException keeps its status, cancellation becomes CANCELLED or
/// DEADLINE_EXCEEDED, anything else INTERNAL (logged with the call). At shutdown (<see cref="ShutdownAsync"/>) calls end as UNAVAILABLE.
/// </summary>
public sealed partial class GrpcDispatcher
{
    private static readonly double[] LatencyBuckets = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30];
    private static readonly TimeSpan MaxTimer = TimeSpan.FromDays(30);
    private readonly GrpcRouter _router;
    private readonly TenantRegistry _tenants;
    private readonly ILogger _log;
    private readonly int _maxReceiveBytes;
    private readonly MetricsRegistry.Counter _calls;
    private readonly MetricsRegistry.Histogram _latency;
    private readonly System.Collections.Concurrent.ConcurrentDictionary<(string, StatusCode), MetricsRegistry.StrongBox> _callSeries = new();
    private readonly System.Collections.Concurrent.ConcurrentDictionary<string, object> _latencySeries = new(StringComparer.Ordinal);

    public GrpcDispatcher(GrpcRouter router, TenantRegistry tenants, MetricsRegistry metrics, ILogger log, int maxReceiveBytes)
    {
        _router = router;
        _tenants = tenants;
        _log = log;
        _maxReceiveBytes = maxReceiveBytes;
        _calls = metrics.CreateCounter("kvfabric_rpc_calls_total", "gRPC calls handled, by method and final status code.", "method", "code");
        _latency = metrics.CreateHistogram("kvfabric_rpc_duration_seconds", "gRPC call duration from request headers to status, by method.", LatencyBuckets, "method");
    }

    /// <summary>
    /// The clock deadlines are measured with: its monotonic timestamp decides whether a deadline passed (a wall clock
    /// stepped by NTP or an operator must neither expire calls early nor let them run late); wall time only fills
    /// <see cref="ServerCall.Deadline"/>. A test seam.
    /// </summary>
    internal TimeProvider Time { get; init; } = TimeProvider.System;

    /// <summary>
    /// How long one read of a client stream (Put) or one flush of a response stream (Get, SubscribeEvents, Watch) may
    /// wait on the client before the call ends (see <see cref="ServerCall.StallTimeout"/>); infinite: never. A client
    /// that is alive but stopped sending or reading would otherwise hold the call's staged blocks, read leases and read
    /// buffers for as long as its connection lasts.
    /// </summary>
    public TimeSpan StreamStallTimeout { get; init; } = DefaultStreamStallTimeout;

    public static readonly TimeSpan DefaultStreamStallTimeout = TimeSpan.FromSeconds(60);

    public async Task HandleAsync(HttpContext http)
    {
        // Counted before the shutdown check below: ShutdownAsync cancels first, then waits for the count. Counted in this
        // frame (a wrapper would add an async frame to every call); the token sources are made only for a call that runs
        // (none for a refused one), and a call without a deadline needs one, not two.
        Interlocked.Increment(ref _running);
        CancellationTokenSource? deadlineCts = null; // the deadline (and the client): what writes wait on
        CancellationTokenSource? callCts = null; // that and the shutdown: the call's token
        try
        {
            HttpRequest request = http.Request;
            HttpResponse response = http.Response;
            if (!HttpMethods.IsPost(request.Method) || !GrpcProtocol.IsGrpcContentType(request.ContentType))
            {
                response.StatusCode = StatusCodes.Status415UnsupportedMediaType;
                response.Headers[GrpcProtocol.StatusHeader] = ((int)StatusCode.Internal).ToString(System.Globalization.CultureInfo.InvariantCulture);
                response.Headers[GrpcProtocol.MessageHeader] = GrpcProtocol.EncodeMessage(
                    $"this endpoint speaks gRPC: POST with content-type application/grpc; got {request.Method} with '{request.ContentType}'");
                return;
            }

            string path = request.Path.Value ?? string.Empty;
            long started = Time.GetTimestamp();
            response.ContentType = GrpcProtocol.ContentType;
            response.Headers[GrpcProtocol.AcceptEncodingHeader] = GrpcProtocol.SupportedEncodings;

            StatusCode status = StatusCode.OK;
            string? detail = null;
            bool routed = _router.TryGet(path, out var route);
            bool watch = routed && route.Watch;
            CancellationToken shutdown = watch ? _watchesEnd.Token : _drainOver.Token;
            ServerCall? call = null;
            bool deadlineHit = false;
            DateTime? deadline = null;
            TimeSpan? budget = null; // the grpc-timeout, measured on the monotonic clock from `started`
            try
            {
                if (_stopping.IsCancellationRequested)
                    throw Refused(path);
                if (!routed)
                    throw new RpcException(StatusCode.Unimplemented, $"method {path} is not served here; served: {string.Join(", ", _router.Services)}");

                string? timeout = request.Headers[GrpcProtocol.TimeoutHeader].FirstOrDefault();
                if (timeout is not null)
                {
                    if (!GrpcProtocol.TryParseTimeout(timeout, out TimeSpan t))
                        throw new RpcException(StatusCode.InvalidArgument, $"malformed grpc-timeout '{timeout}' (expected e.g. 500m or 2S)");
                    if (t <= TimeSpan.Zero)
                        throw new RpcException(StatusCode.DeadlineExceeded, "the call's deadline had already passed when it arrived");
                    if (t < MaxTimer) // longer deadlines (grpc-timeout allows years) are no deadline in practice
                    {
                        budget = t;
                        deadline = Time.GetUtcNow().UtcDateTime + t;
                        deadlineCts = CancellationTokenSource.CreateLinkedTokenSource(http.RequestAborted);
                        deadlineCts.CancelAfter(t);
                    }
                }

                string? encoding = request.Headers[GrpcProtocol.EncodingHeader].FirstOrDefault();
                if (encoding is not null && encoding != "identity" && !string.Equals(encoding, "gzip", StringComparison.OrdinalIgnoreCase))
                    throw new RpcException(StatusCode.Unimplemented, $"grpc-encoding '{encoding}' is not supported; supported: {GrpcProtocol.SupportedEncodings}");

                Tenant? tenant = route.Authenticated
                    ? _tenants.Authenticate(request.Headers.Authorization.FirstOrDefault(), request.Headers[GrpcProtocol.TenantHeader].FirstOrDefault())
                    : null;
                // Writes wait on the client and the deadline; the call's token also on the shutdown (see ServerCall.WriteToken).
                CancellationToken writeToken = deadlineCts?.Token ?? http.RequestAborted;
                callCts = CancellationTokenSource.CreateLinkedTokenSource(writeToken, shutdown);
                call = new ServerCall(http, path, tenant, callCts.Token, deadline, _maxReceiveBytes, Time, started, budget)
                {
                    StallTimeout = StreamStallTimeout, Shutdown = shutdown, WriteToken = writeToken,
                };
                try
                {
                    await route.Handler(call).ConfigureAwait(false);
                }
                catch (Exception e) when (e is OperationCanceledException or RpcException { Status: StatusCode.Cancelled }
                                          && shutdown.IsCancellationRequested && !http.RequestAborted.IsCancellationRequested
                                          && !(budget is { } b && Time.GetElapsedTime(started) >= b))
                {
                    // The node is stopping, not the client cancelling: UNAVAILABLE says to go elsewhere.
                    throw EndedByShutdown(path, watch);
                }
                catch (OperationCanceledException) when (deadlineCts is { IsCancellationRequested: true } && !http.RequestAborted.IsCancellationRequested)
                {
                    deadlineHit = true;
                }
                catch (RpcException) when (deadlineCts is { IsCancellationRequested: true } && !http.RequestAborted.IsCancellationRequested)
                {
                    deadlineHit = true;
                }

                if (deadlineHit)
                    throw new RpcException(StatusCode.DeadlineExceeded, $"{path}: the deadline ({timeout}) passed before the call completed");
            }
            catch (RpcException e)
            {
                status = e.Status;
                detail = e.Detail;
            }
            catch (Exception) when (http.RequestAborted.IsCancellationRequested && budget is { } b && Time.GetElapsedTime(started) >= b)
            {
                // The client reset the stream because its deadline passed (it gives up at the same moment we would).
                status = StatusCode.DeadlineExceeded;
                detail = "the deadline passed";
            }
            catch (OperationCanceledException) when (http.RequestAborted.IsCancellationRequested)
            {
                status = StatusCode.Cancelled;
                detail = "the client cancelled the call";
            }
            catch (Exception e) when (http.RequestAborted.IsCancellationRequested)
            {
                status = StatusCode.Cancelled;
                detail = $"the client went away ({e.GetType().Name})";
            }
            catch (Exception e)
            {
                status = StatusCode.Internal;
                detail = $"{path} failed inside the server: {e.GetType().Name}: {e.Message}";
                _log.LogError(e, "gRPC {Method} from {Peer} failed", path, http.Connection.RemoteIpAddress);
            }

            string method = routed ? path : "unknown";
            _callSeries.GetOrAdd((method, status), k => _calls.WithLabels(k.Item1, k.Item2.ToString())).Add(1);
            _latency.Observe(_latencySeries.GetOrAdd(method, m => _latency.WithLabels(m)), Time.GetElapsedTime(started).TotalSeconds);
            if (status != StatusCode.OK && status != StatusCode.Cancelled)
                _log.LogInformation("gRPC {Method} from {Peer}: {Status} {Detail}", path, http.Connection.RemoteIpAddress, status, detail);
            call?.End();
            if (http.RequestAborted.IsCancellationRequested)
                return;
            if (call?.Stalled == true)
            {
                http.Abort(); // its flow-control window is shut: a status would never get through; RST_STREAM does
                return;
            }

            string code = ((int)status).ToString(System.Globalization.CultureInfo.InvariantCulture);
            if (!response.HasStarted)
            {
                // Trailers-only response: the status goes in the headers of a response without a body.
                response.Headers[GrpcProtocol.StatusHeader] = code;
                if (detail is not null)
                    response.Headers[GrpcProtocol.MessageHeader] = GrpcProtocol.EncodeMessage(detail);
                return;
            }

            response.AppendTrailer(GrpcProtocol.StatusHeader, code);
            if (detail is not null)
                response.AppendTrailer(GrpcProtocol.MessageHeader, GrpcProtocol.EncodeMessage(detail));
        }
        finally
        {
            callCts?.Dispose();
            deadlineCts?.Dispose();
            Interlocked.Decrement(ref _running);
        }
    }
}
