using System.IO.Pipelines;
using Google.Protobuf;
using KvFabric.Client.Grpc;
using Microsoft.AspNetCore.Http;

namespace KvFabric.Rpc;

/// <summary>The server side of one call: its tenant, deadline-aware cancellation, request and response message streams.</summary>
public sealed class ServerCall
{
    private readonly HttpContext _http;
    private readonly int _maxReceiveBytes;
    private readonly string? _encoding;
    private readonly TimeProvider _time;
    private readonly long _started;
    private readonly TimeSpan? _budget;

    internal ServerCall(HttpContext http, string method, Tenant? tenant, CancellationToken cancellationToken, DateTime? deadline,
        int maxReceiveBytes, TimeProvider? time = null, long started = 0, TimeSpan? budget = null)
    {
        _time = time ?? TimeProvider.System;
        _started = started;
        _budget = budget;
        _http = http;
        Method = method;
        Tenant = tenant;
        CancellationToken = cancellationToken;
        Deadline = deadline;
        _maxReceiveBytes = maxReceiveBytes;
        _encoding = http.Request.Headers[GrpcProtocol.EncodingHeader].FirstOrDefault();
    }

    public string Method { get; }

    /// <summary>The authenticated tenant; null only for calls that need none (health).</summary>
    public Tenant? Tenant { get; }

    /// <summary>The authenticated tenant of a call that requires one.</summary>
    public Tenant RequiredTenant => Tenant ?? throw new InvalidOperationException($"{Method} has no tenant");

    /// <summary>Cancelled when the client cancels, the connection breaks, or the deadline passes.</summary>
    public CancellationToken CancellationToken { get; }

    /// <summary>The deadline as wall-clock time (UTC), for display; use <see cref="TimeLeft"/> to budget work.</summary>
    public DateTime? Deadline { get; }

    /// <summary>
    /// What is left of the call's grpc-timeout (negative once it passed), measured on the monotonic clock so that a
    /// wall-clock step does not change it; null when the call has no deadline.
    /// </summary>
    public TimeSpan? TimeLeft => _budget - _time.GetElapsedTime(_started);

    public string Peer => $"{_http.Connection.RemoteIpAddress}:{_http.Connection.RemotePort}";

    public IHeaderDictionary RequestHeaders => _http.Request.Headers;

    public long BytesReceived { get; internal set; }
    public long BytesSent { get; internal set; }

    internal bool ResponseStarted => _http.Response.HasStarted;

    /// <summary>True once the client reset the stream or the connection broke (not merely the deadline passing).</summary>
    internal bool ClientGone => _http.RequestAborted.IsCancellationRequested;

    /// <summary>Adds custom metadata to the response headers (before the first message is written).</summary>
    public void AddResponseHeader(string name, string value) => _http.Response.Headers.Append(name, value);

    /// <summary>Reads the next request message; null at the end of the request stream.</summary>
    public ValueTask<T?> ReadAsync<T>(MessageParser<T> parser) where T : class, IMessage<T> =>
        GrpcFraming.ReadAsync(_http.Request.BodyReader, parser, _maxReceiveBytes, _encoding, CancellationToken);

    /// <summary>Reads the next request message with a decoder that sees its raw bytes (valid only during the call); null at the end.</summary>
    public ValueTask<T?> ReadAsync<T>(Func<System.Buffers.ReadOnlySequence<byte>, T> decode) where T : class =>
        GrpcFraming.ReadAsync(_http.Request.BodyReader, decode, _maxReceiveBytes, _encoding, CancellationToken);

    /// <summary>Writes one response message and flushes it.</summary>
    public ValueTask WriteAsync(IMessage message) =>
        GrpcFraming.WriteAndFlushAsync(_http.Response.BodyWriter, message, CancellationToken);

    /// <summary>Writes one response message without flushing (several are sent together by the next flush).</summary>
    public void Write(IMessage message) => GrpcFraming.Write(_http.Response.BodyWriter, message);

    public async ValueTask FlushAsync()
    {
        FlushResult result = await _http.Response.BodyWriter.FlushAsync(CancellationToken).ConfigureAwait(false);
        if (result.IsCanceled || result.IsCompleted)
            throw new RpcException(StatusCode.Cancelled, "the client stopped reading this stream");
    }

    /// <summary>Sends the response headers now (bidirectional calls, so the client sees the call start).</summary>
    public Task StartResponseAsync() => _http.Response.StartAsync(CancellationToken);
}
