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

    /// <summary>Cancelled when the server's shutdown ends this call (a watch stream at once, other calls after the drain period).</summary>
    internal CancellationToken Shutdown { get; init; }

    /// <summary>
    /// What a flush to the client waits on: the client and the deadline, not the shutdown. Kestrel resets a stream whose
    /// flush is cancelled (RST_STREAM INTERNAL_ERROR, which clients read as INTERNAL); at shutdown a stream instead
    /// ends between two messages (<see cref="FlushAsync"/>), with a status after what it sent.
    /// </summary>
    internal CancellationToken WriteToken
    {
        get => _writeToken.CanBeCanceled ? _writeToken : CancellationToken;
        init => _writeToken = value;
    }

    private readonly CancellationToken _writeToken;

    /// <summary>True once the server's shutdown ended this call (its <see cref="CancellationToken"/> then fired for that).</summary>
    public bool ShuttingDown => Shutdown.IsCancellationRequested;

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

    /// <summary>
    /// Reads the next request message of a client stream with a decoder that sees its raw bytes (valid only during the
    /// call); null at the end. A client that sends nothing for <see cref="StallTimeout"/> fails the call with
    /// DEADLINE_EXCEEDED: what it has streamed so far (staged blocks) is not held for a client that stopped.
    /// </summary>
    public async ValueTask<T?> ReadAsync<T>(Func<System.Buffers.ReadOnlySequence<byte>, T> decode) where T : class
    {
        CancellationToken token = ArmStall(CancellationToken);
        try
        {
            return await GrpcFraming.ReadAsync(_http.Request.BodyReader, decode, _maxReceiveBytes, _encoding, token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (StallFired)
        {
            throw new RpcException(StatusCode.DeadlineExceeded,
                $"{Method}: no request message arrived for {StallTimeout.TotalSeconds:0.#} s (stream_stall_timeout_s); the call ended and nothing it streamed was kept: send the whole stream without pausing, or raise the timeout");
        }
        finally
        {
            DisarmStall();
        }
    }

    /// <summary>
    /// Writes one response message of a stream and flushes it. A client that reads nothing for <see cref="StallTimeout"/>
    /// while the message waits ends the call (its stream is reset): what the call holds, such as the blocks of a Get, is
    /// not held for a client that stopped reading.
    /// </summary>
    public async ValueTask WriteAsync(IMessage message)
    {
        GrpcFraming.Write(_http.Response.BodyWriter, message);
        await FlushAsync().ConfigureAwait(false);
    }

    /// <summary>Writes a call's one response message and flushes it (unary and client-streaming answers: small, the last).</summary>
    internal ValueTask WriteLastAsync(IMessage message) =>
        GrpcFraming.WriteAndFlushAsync(_http.Response.BodyWriter, message, WriteToken);

    /// <summary>Writes one response message without flushing (several are sent together by the next flush).</summary>
    public void Write(IMessage message) => GrpcFraming.Write(_http.Response.BodyWriter, message);

    /// <summary>Flushes what was written; bounded by <see cref="StallTimeout"/> as <see cref="WriteAsync"/> is.</summary>
    public async ValueTask FlushAsync()
    {
        // Shutting down: what was written goes out with the status that ends the stream.
        Shutdown.ThrowIfCancellationRequested();
        CancellationToken token = ArmStall(WriteToken);
        FlushResult result;
        try
        {
            result = await _http.Response.BodyWriter.FlushAsync(token).ConfigureAwait(false);
        }
        catch (OperationCanceledException) when (StallFired)
        {
            throw WriteStalled();
        }
        finally
        {
            DisarmStall();
        }

        if (result.IsCanceled || result.IsCompleted)
        {
            if (StallFired)
                throw WriteStalled();

            throw new RpcException(StatusCode.Cancelled, "the client stopped reading this stream");
        }
    }

    /// <summary>
    /// How long one read of a client stream or one flush to the client may wait (infinite: no bound). Set by the
    /// dispatcher; calls that only wait on their own work (a unary call) are not bounded by it.
    /// </summary>
    public TimeSpan StallTimeout { get; internal set; } = Timeout.InfiniteTimeSpan;

    /// <summary>A flush outwaited <see cref="StallTimeout"/>: the dispatcher resets the stream instead of ending it.</summary>
    internal bool Stalled { get; private set; }

    private CancellationTokenSource? _stall;

    private CancellationToken _stallBase;

    private bool StallFired => _stall is { IsCancellationRequested: true } && !_stallBase.IsCancellationRequested;

    // A flush outwaited the stall timeout: the dispatcher resets the stream (Stalled) instead of sending a status.
    private RpcException WriteStalled()
    {
        Stalled = true;
        return new RpcException(StatusCode.DeadlineExceeded,
            $"{Method}: the client read nothing for {StallTimeout.TotalSeconds:0.#} s (stream_stall_timeout_s); its stream was reset");
    }

    private CancellationToken ArmStall(CancellationToken baseToken)
    {
        _stallBase = baseToken;
        if (StallTimeout == Timeout.InfiniteTimeSpan)
            return baseToken;
        // One source per operation: the timer of an earlier one (even a callback already on its way when that operation
        // completed) can never cancel this one, and no operation starts with a token that is already cancelled.
        _stall?.Dispose();
        _stall = CancellationTokenSource.CreateLinkedTokenSource(baseToken);
        _stall.CancelAfter(StallTimeout);
        return _stall.Token;
    }

    private void DisarmStall()
    {
        if (_stall is { IsCancellationRequested: false } stall)
            stall.CancelAfter(Timeout.InfiniteTimeSpan);
    }

    /// <summary>The call ended: its stall timer goes.</summary>
    internal void End() => _stall?.Dispose();

    /// <summary>Sends the response headers now (bidirectional calls, so the client sees the call start).</summary>
    public Task StartResponseAsync() => _http.Response.StartAsync(CancellationToken);
}
