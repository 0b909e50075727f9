using System.IO.Pipelines;
using System.Net;
using System.Net.Http.Headers;
using Google.Protobuf;

namespace KvFabric.Client.Grpc;

/// <summary>
/// One call on an RpcChannel. Unary and server-streaming calls are created with their request; client-streaming and
/// bidirectional calls write requests with WriteAsync and end them with CompleteAsync. Responses are read with ReadAsync
/// (null at the end, after the status was checked: a status other than OK throws RpcException).
/// </summary>
public sealed class GrpcCall<TRequest, TResponse> : IAsyncDisposable
    where TRequest : IMessage<TRequest> where TResponse : class, IMessage<TResponse>
{
    private readonly RpcChannel _channel;
    private readonly string _method;
    private readonly MessageParser<TResponse> _parser;
    private readonly CancellationTokenSource _cts;
    private readonly CancellationToken _userToken;
    private readonly TimeSpan? _deadline;
    private readonly PushContent? _push;
    private readonly Task<HttpResponseMessage> _send;
    private PipeWriter? _writer;
    private HttpResponseMessage? _response;
    private PipeReader? _reader;
    private string? _encoding;
    private bool _finished;
    private int _disposed;
    // Once the response arrived: disposing it is what resets the HTTP/2 stream (cancelling the send no longer does).
    private CancellationTokenRegistration _resetOnCancel;
    private readonly bool _single;
    private static readonly TimeSpan MaxTimer = TimeSpan.FromDays(30);

    internal GrpcCall(RpcChannel channel, string method, MessageParser<TResponse> parser, CallOptions options, TRequest? single,
        bool unary = false)
    {
        _single = unary;
        _channel = channel;
        _method = method;
        _parser = parser;
        _userToken = options.CancellationToken;
        _deadline = options.Deadline ?? channel.Options.DefaultDeadline;
        if (_deadline == Timeout.InfiniteTimeSpan)
            _deadline = null; // an explicit "no deadline" (long-lived streams)
        _cts = CancellationTokenSource.CreateLinkedTokenSource(options.CancellationToken);
        if (_deadline is { } d)
        {
            // A deadline that already passed ends the call as DEADLINE_EXCEEDED; one beyond what a timer can hold (about
            // 49 days; TimeSpan.MaxValue is a common "no deadline") is no local deadline, as on the server.
            if (d <= TimeSpan.Zero)
                _cts.Cancel();
            else if (d < MaxTimer)
                _cts.CancelAfter(d);
        }

        HttpRequestMessage request = channel.CreateRequest(method, _deadline, options.Metadata);
        if (single is not null)
        {
            int size = single.CalculateSize();
            byte[] body = new byte[GrpcProtocol.MessagePrefixBytes + size];
            body[1] = (byte)(size >> 24);
            body[2] = (byte)(size >> 16);
            body[3] = (byte)(size >> 8);
            body[4] = (byte)size;
            single.WriteTo(body.AsSpan(GrpcProtocol.MessagePrefixBytes));
            request.Content = new ByteArrayContent(body);
        }
        else
        {
            _push = new PushContent();
            request.Content = _push;
        }

        request.Content.Headers.ContentType = new MediaTypeHeaderValue(GrpcProtocol.ContentType);
        _send = channel.Http.SendAsync(request, _cts.Token);
        if (_push is not null)
            _ = _send.ContinueWith(t => _push.Fail(t.Exception?.InnerException ?? new OperationCanceledException()),
                CancellationToken.None, TaskContinuationOptions.NotOnRanToCompletion, TaskScheduler.Default);
    }

    /// <summary>True once response headers arrived (a retry would no longer be safe).</summary>
    public bool ResponseStarted => _response is not null;

    /// <summary>Response headers (custom metadata sent by the server), once they arrived.</summary>
    public HttpResponseHeaders? ResponseHeaders => _response?.Headers;

    public async ValueTask WriteAsync(TRequest message)
    {
        if (_push is null)
            throw new InvalidOperationException("this call was created with its request; it takes no more messages");
        try
        {
            _writer ??= PipeWriter.Create(await _push.Stream.WaitAsync(_cts.Token).ConfigureAwait(false), new StreamPipeWriterOptions(minimumBufferSize: 64 * 1024, leaveOpen: true));
            await GrpcFraming.WriteAndFlushAsync(_writer, message, _cts.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not RpcException)
        {
            throw await FailureAsync(e).ConfigureAwait(false);
        }
    }

    /// <summary>Ends the request stream (half-close); responses can still be read.</summary>
    public async ValueTask CompleteAsync()
    {
        if (_push is null)
            return;
        try
        {
            if (_writer is not null)
                await _writer.CompleteAsync().ConfigureAwait(false);
            else
                await _push.Stream.WaitAsync(_cts.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not RpcException)
        {
            throw await FailureAsync(e).ConfigureAwait(false);
        }

        _push.Complete();
    }

    /// <summary>The next response message; null when the server ended the stream with OK.</summary>
    public ValueTask<TResponse?> ReadAsync() => ReadAsync(_parse ??= payload => _parser.ParseFrom(payload));

    private Func<System.Buffers.ReadOnlySequence<byte>, TResponse>? _parse;

    /// <summary>
    /// Reads the next response message with a custom decoder that sees the raw protobuf bytes (valid only during the
    /// call), e.g. to copy a large bytes field straight to its destination. Null when the server ended the stream with OK.
    /// </summary>
    public async ValueTask<T?> ReadAsync<T>(Func<System.Buffers.ReadOnlySequence<byte>, T> decode) where T : class
    {
        if (_finished)
            return null;
        try
        {
            if (_reader is null)
            {
                _response = await _send.WaitAsync(_cts.Token).ConfigureAwait(false);
                ResetOnCancel(_response);
                CheckHeaders(_response);
                if (_finished)
                    return null;
                _encoding = _response.Headers.TryGetValues(GrpcProtocol.EncodingHeader, out var enc) ? enc.FirstOrDefault() : null;
                Stream body = await _response.Content.ReadAsStreamAsync(_cts.Token).ConfigureAwait(false);
                // Small buffers for unary answers; large ones where block bytes stream in.
                _reader = PipeReader.Create(body, _push is null && _single
                    ? new StreamPipeReaderOptions(bufferSize: 4096, minimumReadSize: 1024)
                    : new StreamPipeReaderOptions(bufferSize: 64 * 1024, minimumReadSize: 16 * 1024));
            }

            T? message = await GrpcFraming.ReadAsync(_reader, payload => Decode(payload, decode), _channel.Options.MaxReceiveMessageBytes,
                _encoding, _cts.Token).ConfigureAwait(false);
            if (message is null)
            {
                _finished = true;
                CheckStatus(_response!.TrailingHeaders, trailersOnly: false);
            }

            return message;
        }
        catch (Exception e) when (e is not RpcException)
        {
            throw await FailureAsync(e).ConfigureAwait(false);
        }
    }

    private static T Decode<T>(System.Buffers.ReadOnlySequence<byte> payload, Func<System.Buffers.ReadOnlySequence<byte>, T> decode)
    {
        try
        {
            return decode(payload);
        }
        catch (InvalidProtocolBufferException e)
        {
            throw new RpcException(StatusCode.Internal, $"the server sent a malformed {typeof(TResponse).Name}: {e.Message}", e);
        }
    }

    /// <summary>
    /// For a reader that parses the body itself (to put block bytes straight in place): the response body stream once the
    /// headers were checked; null when the call already ended with OK (trailers-only) or when the messages are
    /// compressed (then use ReadAsync). After the stream ended, call <see cref="EndRaw"/> for the final status. Not to be
    /// mixed with ReadAsync on the same call.
    /// </summary>
    public async ValueTask<Stream?> OpenRawBodyAsync()
    {
        if (_finished || _reader is not null)
            return null;
        try
        {
            _response = await _send.WaitAsync(_cts.Token).ConfigureAwait(false);
            ResetOnCancel(_response);
            CheckHeaders(_response);
            if (_finished)
                return null;
            _encoding = _response.Headers.TryGetValues(GrpcProtocol.EncodingHeader, out var enc) ? enc.FirstOrDefault() : null;
            if (_encoding is not null && _encoding != "identity")
                return null;
            _raw = true;
            return await _response.Content.ReadAsStreamAsync(_cts.Token).ConfigureAwait(false);
        }
        catch (Exception e) when (e is not RpcException)
        {
            throw await FailureAsync(e).ConfigureAwait(false);
        }
    }

    private bool _raw;

    /// <summary>Cancelled with the call (deadline, caller); for the raw body's reads.</summary>
    public CancellationToken RawToken => _cts.Token;

    /// <summary>The raw body stream ended: checks the final status (throws RpcException unless OK).</summary>
    public void EndRaw()
    {
        if (!_raw)
            throw new InvalidOperationException("EndRaw without OpenRawBodyAsync");
        _finished = true;
        CheckStatus(_response!.TrailingHeaders, trailersOnly: false);
    }

    /// <summary>Turns a failure of a raw body read into the call's RpcException (caller, deadline, server, connection).</summary>
    public ValueTask<RpcException> RawFailureAsync(Exception e) => FailureAsync(e);

    /// <summary>Reads (and drops) what is left and checks the final status.</summary>
    public async ValueTask ReadToEndAsync()
    {
        while (await ReadAsync().ConfigureAwait(false) is not null)
        {
        }
    }

    /// <summary>Writes every request, half-closes, and returns the single response (client streaming).</summary>
    public async ValueTask<TResponse> ResponseAsync()
    {
        await CompleteAsync().ConfigureAwait(false);
        TResponse response = await ReadAsync().ConfigureAwait(false)
            ?? throw new RpcException(StatusCode.Internal, $"{_method}: the server ended the call without a response message");
        await ReadToEndAsync().ConfigureAwait(false);
        return response;
    }

    private void CheckHeaders(HttpResponseMessage response)
    {
        // A trailers-only response carries grpc-status in its headers.
        if (response.Headers.Contains(GrpcProtocol.StatusHeader))
        {
            CheckStatus(response.Headers, trailersOnly: true);
            _finished = true;
        }

        if (response.StatusCode != HttpStatusCode.OK)
        {
            throw new RpcException(GrpcProtocol.FromHttpStatus(response.StatusCode),
                $"{_method}: HTTP {(int)response.StatusCode} {response.ReasonPhrase} from {_channel.Options.Address} (is it a gRPC server?)");
        }

        string? contentType = response.Content.Headers.ContentType?.MediaType;
        if (!_finished && !GrpcProtocol.IsGrpcContentType(contentType))
            throw new RpcException(StatusCode.Internal, $"{_method}: response content-type is '{contentType}', not application/grpc");
    }

    private void CheckStatus(HttpHeaders headers, bool trailersOnly)
    {
        if (!headers.TryGetValues(GrpcProtocol.StatusHeader, out var values))
        {
            throw new RpcException(StatusCode.Internal,
                $"{_method}: the server ended the stream without grpc-status (was the connection cut, or is it a gRPC server?)");
        }

        string raw = values.First();
        if (!int.TryParse(raw, out int code) || code is < 0 or > 16)
            throw new RpcException(StatusCode.Unknown, $"{_method}: unknown grpc-status '{raw}'");
        if (code == 0)
        {
            if (trailersOnly)
                _finished = true;
            return;
        }

        string detail = GrpcProtocol.DecodeMessage(headers.TryGetValues(GrpcProtocol.MessageHeader, out var msg) ? msg.First() : null);
        throw new RpcException((StatusCode)code, string.IsNullOrEmpty(detail) ? $"{_method} failed" : detail);
    }

    private async ValueTask<RpcException> FailureAsync(Exception e)
    {
        if (_userToken.IsCancellationRequested)
            return new RpcException(StatusCode.Cancelled, $"{_method}: cancelled by the caller", e);
        if (_cts.IsCancellationRequested)
            return new RpcException(StatusCode.DeadlineExceeded, $"{_method}: deadline of {_deadline} expired before the call completed", e);
        // The server may have ended the call already (e.g. it refused a client stream's first message): its status is the
        // reason this side failed, not the broken write. Its answer can trail the reset that broke the write: wait a little.
        if (!_send.IsCompleted)
            await Task.WhenAny(_send, Task.Delay(TimeSpan.FromSeconds(2), CancellationToken.None)).ConfigureAwait(false);
        if (_send.IsCompletedSuccessfully && await ServerStatusAsync(_send.Result).ConfigureAwait(false) is { } serverStatus)
            return serverStatus;
        if (_send.IsCompleted || _push is null)
        {
            try
            {
                await _send.ConfigureAwait(false);
            }
            catch (HttpRequestException he)
            {
                return new RpcException(StatusCode.Unavailable, $"{_method}: cannot reach {_channel.Options.Address}: {he.Message}", he);
            }
            catch (Exception)
            {
                // reported below
            }
        }

        if (e is HttpRequestException hre)
            return new RpcException(StatusCode.Unavailable, $"{_method}: cannot reach {_channel.Options.Address}: {hre.Message}", hre);
        // The body ended cleanly (END_STREAM, not a reset) inside a message, and the server named no error: a truncated
        // stream is INTERNAL, as GrpcFraming reports it on the message path; not a broken connection worth retrying.
        if (e is EndOfStreamException)
            return new RpcException(StatusCode.Internal, $"{_method}: the response stream ended inside a message: {e.Message}", e);
        if (e is IOException or HttpIOException)
            return new RpcException(StatusCode.Unavailable, $"{_method}: the connection to {_channel.Options.Address} broke: {e.Message}", e);
        return new RpcException(StatusCode.Internal, $"{_method}: {e.GetType().Name}: {e.Message}", e);
    }

    private async ValueTask<RpcException?> ServerStatusAsync(HttpResponseMessage response)
    {
        HttpHeaders? source = response.Headers.Contains(GrpcProtocol.StatusHeader) ? response.Headers : null;
        if (source is null)
        {
            try
            {
                // Drain what is left of the body (bounded) so the trailers are there to read.
                using var drain = new CancellationTokenSource(TimeSpan.FromSeconds(2));
                await response.Content.CopyToAsync(Stream.Null, drain.Token).ConfigureAwait(false);
            }
            catch (Exception)
            {
                return null;
            }

            if (!response.TrailingHeaders.Contains(GrpcProtocol.StatusHeader))
                return null;
            source = response.TrailingHeaders;
        }

        try
        {
            CheckStatus(source, trailersOnly: false);
            return null;
        }
        catch (RpcException e)
        {
            return e;
        }
    }

    // The caller's cancellation or the deadline resets the stream at once, whether or not a read is waiting: the server's
    // call (a Watch, a Get holding its blocks) ends then, not when the call object is disposed.
    private void ResetOnCancel(HttpResponseMessage response) =>
        _resetOnCancel = _cts.Token.UnsafeRegister(static r => ((HttpResponseMessage)r!).Dispose(), response);

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        await _resetOnCancel.DisposeAsync().ConfigureAwait(false);
        if (!_finished)
            await _cts.CancelAsync().ConfigureAwait(false); // ends a request still being sent; the response is disposed below
        _push?.Fail(new OperationCanceledException("call disposed"));
        if (_reader is not null)
            await _reader.CompleteAsync().ConfigureAwait(false);
        try
        {
            await _send.ConfigureAwait(false);
        }
        catch (Exception)
        {
            // the failure (if any) was already reported to the reader/writer
        }

        // A response nobody read (a streaming call disposed before its first ReadAsync, or one only looked at for the
        // server's status): cancelling the send no longer touches an HTTP/2 stream whose request body was sent, so only
        // disposing the response resets it; else the stream and the server's call (its leases, its buffers) stay open.
        HttpResponseMessage? response = _response ?? (_send.IsCompletedSuccessfully ? _send.Result : null);
        response?.Dispose();
        _cts.Dispose();
    }

    /// <summary>Request content whose stream the call writes messages to as they come; ends when Complete() is called.</summary>
    private sealed class PushContent : HttpContent
    {
        private readonly TaskCompletionSource<Stream> _stream = new(TaskCreationOptions.RunContinuationsAsynchronously);
        private readonly TaskCompletionSource _done = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public Task<Stream> Stream => _stream.Task;

        public void Complete() => _done.TrySetResult();

        public void Fail(Exception e)
        {
            _stream.TrySetException(e);
            _done.TrySetException(e);
        }

        protected override Task SerializeToStreamAsync(Stream stream, TransportContext? context)
        {
            _stream.TrySetResult(stream);
            return _done.Task;
        }

        protected override bool TryComputeLength(out long length)
        {
            length = -1;
            return false;
        }
    }
}
