using System.Net;
using System.Net.Security;
using Google.Protobuf;

namespace KvFabric.Client.Grpc;

public sealed record RpcChannelOptions
{
    /// <summary>http://host:port for h2c (HTTP/2 with prior knowledge), https://host:port for TLS.</summary>
    public required Uri Address { get; init; }
    /// <summary>Sent as "authorization: Bearer ..." on every call.</summary>
    public string? Token { get; init; }
    /// <summary>Sent as "x-kvfabric-tenant" on every call.</summary>
    public string? Tenant { get; init; }
    public int MaxReceiveMessageBytes { get; init; } = 16 << 20;
    /// <summary>Used for calls that give no deadline of their own; null means none.</summary>
    public TimeSpan? DefaultDeadline { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>
    /// Extra attempts for idempotent unary calls that failed with UNAVAILABLE: the node could not be reached, or it
    /// answered UNAVAILABLE (it is shutting down, a tier's store failed) without a response message.
    /// </summary>
    public int MaxRetries { get; init; } = 3;
    /// <summary>The wait before the first retry, doubled for each later one (at most <see cref="RpcChannel.MaxRetryBackoff"/>); at least 1 ms.</summary>
    public TimeSpan RetryBackoff { get; init; } = TimeSpan.FromMilliseconds(50);
    /// <summary>Accepts a server certificate that fails validation (a self-signed development certificate).</summary>
    public RemoteCertificateValidationCallback? ServerCertificateValidation { get; init; }
    /// <summary>A handler to use instead of the channel's own (tests, proxies); the channel does not dispose it.</summary>
    public HttpMessageHandler? Handler { get; init; }
}

/// <summary>Per-call options: deadline, cancellation and extra metadata.</summary>
public readonly record struct CallOptions(TimeSpan? Deadline = null, CancellationToken CancellationToken = default,
    IReadOnlyList<KeyValuePair<string, string>>? Metadata = null);

/// <summary>
/// A gRPC client channel over HttpClient and HTTP/2: unary, client-streaming, server-streaming and bidirectional calls,
/// deadlines sent as grpc-timeout and enforced locally, cancellation (RST_STREAM), retries of idempotent calls.
/// Thread-safe; one channel multiplexes any number of concurrent calls.
/// </summary>
public sealed class RpcChannel : IDisposable
{
    /// <summary>The longest wait between two attempts of a retried call.</summary>
    public static readonly TimeSpan MaxRetryBackoff = TimeSpan.FromSeconds(30);

    /// <summary>The wait before retry attempt + 1: the backoff doubled per attempt, at most MaxRetryBackoff (a large
    /// MaxRetries or backoff must neither overflow nor ask Task.Delay for more than it can wait).</summary>
    internal static TimeSpan RetryDelay(TimeSpan backoff, int attempt) =>
        TimeSpan.FromMilliseconds(Math.Min(backoff.TotalMilliseconds * Math.Pow(2, Math.Min(attempt, 30)), MaxRetryBackoff.TotalMilliseconds));

    private readonly HttpMessageInvoker _http;
    private readonly bool _ownsHandler;

    public RpcChannel(RpcChannelOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.Address.Scheme is not ("http" or "https"))
            throw new ArgumentException($"gRPC address must be http://host:port (h2c) or https://host:port (TLS); got {options.Address}", nameof(options));
        if (options.MaxRetries < 0)
            throw new ArgumentOutOfRangeException(nameof(options), options.MaxRetries, "MaxRetries must be 0 (no retries) or more");
        if (options.MaxRetries > 0 && options.RetryBackoff < TimeSpan.FromMilliseconds(1))
        {
            throw new ArgumentOutOfRangeException(nameof(options), options.RetryBackoff,
                "RetryBackoff must be at least 1 ms when MaxRetries is above 0: a smaller one retries a refusing node in a tight loop; set MaxRetries = 0 for no retries");
        }

        Options = options;
        HttpMessageHandler handler;
        if (options.Handler is not null)
        {
            handler = options.Handler;
        }
        else
        {
            var sockets = new SocketsHttpHandler
            {
                EnableMultipleHttp2Connections = true,
                InitialHttp2StreamWindowSize = 16 << 20,
                ConnectTimeout = TimeSpan.FromSeconds(5),
                KeepAlivePingDelay = TimeSpan.FromSeconds(30),
                KeepAlivePingTimeout = TimeSpan.FromSeconds(10),
                KeepAlivePingPolicy = HttpKeepAlivePingPolicy.WithActiveRequests,
                PooledConnectionIdleTimeout = TimeSpan.FromMinutes(5),
                AutomaticDecompression = DecompressionMethods.None,
                UseCookies = false,
                UseProxy = false,
            };
            if (options.ServerCertificateValidation is not null)
                sockets.SslOptions = new SslClientAuthenticationOptions { RemoteCertificateValidationCallback = options.ServerCertificateValidation };
            handler = sockets;
            _ownsHandler = true;
        }

        _http = new HttpMessageInvoker(handler, disposeHandler: _ownsHandler);
        _authorization = options.Token is null ? null : "Bearer " + options.Token;
    }

    private readonly string? _authorization;

    public RpcChannelOptions Options { get; }

    internal HttpMessageInvoker Http => _http;

    /// <summary>
    /// The clock a unary call's retries measure its deadline with: the monotonic timestamp, so that a wall-clock step
    /// (NTP, an operator) neither expires the call's retries early nor lets them run past the deadline. A test seam.
    /// </summary>
    internal TimeProvider Time { get; init; } = TimeProvider.System;

    public async Task<TResponse> UnaryAsync<TRequest, TResponse>(string method, TRequest request, MessageParser<TResponse> parser,
        CallOptions options = default, bool idempotent = false)
        where TRequest : IMessage<TRequest> where TResponse : class, IMessage<TResponse>
    {
        ArgumentNullException.ThrowIfNull(request);
        long started = Time.GetTimestamp();
        TimeSpan? total = options.Deadline ?? Options.DefaultDeadline;
        if (total == Timeout.InfiniteTimeSpan)
            total = null;
        for (int attempt = 0; ; attempt++)
        {
            // Retries share the call's deadline: each attempt gets what is left of it.
            TimeSpan? left = total - Time.GetElapsedTime(started);
            if (left <= TimeSpan.Zero)
                throw new RpcException(StatusCode.DeadlineExceeded, $"{method}: deadline of {total} expired before the call completed");
            await using var call = new GrpcCall<TRequest, TResponse>(this, method, parser,
                options with { Deadline = left ?? Timeout.InfiniteTimeSpan }, request, unary: true);
            try
            {
                TResponse? response = await call.ReadAsync().ConfigureAwait(false)
                    ?? throw new RpcException(StatusCode.Internal, $"{method}: the server ended the call without a response message");
                await call.ReadToEndAsync().ConfigureAwait(false);
                return response;
            }
            // No response message reached the caller (a unary call returns it only on success), so an idempotent call
            // can go again whether the node was unreachable or answered UNAVAILABLE itself (a node shutting down
            // refuses calls that raced its GOAWAY that way).
            catch (RpcException e) when (idempotent && e.Status == StatusCode.Unavailable
                                         && attempt < Options.MaxRetries && !options.CancellationToken.IsCancellationRequested)
            {
                TimeSpan backoff = RetryDelay(Options.RetryBackoff, attempt);
                if (total is { } d && Time.GetElapsedTime(started) + backoff >= d)
                    throw;
                try
                {
                    await Task.Delay(backoff, options.CancellationToken).ConfigureAwait(false);
                }
                catch (OperationCanceledException oce)
                {
                    throw new RpcException(StatusCode.Cancelled, $"{method}: cancelled by the caller while waiting to retry", oce);
                }
            }
        }
    }

    /// <summary>A server-streaming call: read responses with ReadAsync until null.</summary>
    public GrpcCall<TRequest, TResponse> ServerStreaming<TRequest, TResponse>(string method, TRequest request,
        MessageParser<TResponse> parser, CallOptions options = default)
        where TRequest : IMessage<TRequest> where TResponse : class, IMessage<TResponse>
    {
        ArgumentNullException.ThrowIfNull(request);
        return new GrpcCall<TRequest, TResponse>(this, method, parser, options, request);
    }

    /// <summary>A client-streaming or bidirectional call: WriteAsync requests, CompleteAsync, read responses.</summary>
    public GrpcCall<TRequest, TResponse> Streaming<TRequest, TResponse>(string method, MessageParser<TResponse> parser,
        CallOptions options = default)
        where TRequest : IMessage<TRequest> where TResponse : class, IMessage<TResponse>
        => new(this, method, parser, options, default);

    internal HttpRequestMessage CreateRequest(string method, TimeSpan? deadline, IReadOnlyList<KeyValuePair<string, string>>? metadata)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, new Uri(Options.Address, method))
        {
            Version = HttpVersion.Version20,
            VersionPolicy = HttpVersionPolicy.RequestVersionExact,
        };
        request.Headers.TryAddWithoutValidation("te", "trailers");
        request.Headers.TryAddWithoutValidation("user-agent", "grpc-kvfabric-csharp/1.0");
        request.Headers.TryAddWithoutValidation(GrpcProtocol.AcceptEncodingHeader, GrpcProtocol.SupportedEncodings);
        if (deadline is { } d)
            request.Headers.TryAddWithoutValidation(GrpcProtocol.TimeoutHeader, GrpcProtocol.FormatTimeout(d));
        if (Options.Token is not null)
            request.Headers.TryAddWithoutValidation("authorization", _authorization);
        if (Options.Tenant is not null)
            request.Headers.TryAddWithoutValidation(GrpcProtocol.TenantHeader, Options.Tenant);
        if (metadata is not null)
        {
            foreach (var (key, value) in metadata)
                request.Headers.TryAddWithoutValidation(key, value);
        }

        return request;
    }

    public void Dispose() => _http.Dispose();
}
