using System.Buffers;
using System.IO.Pipelines;
using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>
/// The stall timer is one per call, re-armed per read or flush. When it fires just as an operation completes anyway (the
/// message arrived, or the client read, at that moment), the next operation must get a fresh timer, not the already
/// cancelled token: a client that is keeping up must not see DEADLINE_EXCEEDED or have its stream reset.
/// </summary>
public sealed class StallRearmTests
{
    // Long enough that the second operation, which completes at once, never meets its own timer on a loaded machine.
    private static readonly TimeSpan Stall = TimeSpan.FromSeconds(1);

    [Fact]
    public async Task A_read_that_completes_as_the_stall_timer_fires_does_not_fail_the_next_read()
    {
        var http = new DefaultHttpContext();
        var reader = new LateReader(GrpcFraming.ToFrame(new KvFabric.Rpc.V1.PutResponse { Stored = 1 }));
        http.Features.Set<IRequestBodyPipeFeature>(new BodyPipe(reader));
        var call = new ServerCall(http, "/kvfabric.v1.Fabric/Put", null, CancellationToken.None, null, 1 << 20) { StallTimeout = Stall };

        Assert.NotNull(await call.ReadAsync(payload => new object()).AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        // The client sent its end of stream at once: the next read must see it, not a stall.
        Assert.Null(await call.ReadAsync(payload => new object()).AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        call.End();
    }

    [Fact]
    public async Task A_flush_that_completes_as_the_stall_timer_fires_does_not_reset_the_next_flush()
    {
        var http = new DefaultHttpContext();
        var writer = new LateWriter();
        http.Features.Set<IHttpResponseBodyFeature>(new ResponseBody(writer));
        var call = new ServerCall(http, "/grpc.health.v1.Health/Watch", null, CancellationToken.None, null, 1 << 20) { StallTimeout = Stall };

        await call.WriteAsync(new KvFabric.Rpc.V1.PutResponse { Stored = 1 }).AsTask().WaitAsync(TimeSpan.FromSeconds(30));
        // The client reads: this flush completes at once.
        await call.WriteAsync(new KvFabric.Rpc.V1.PutResponse { Stored = 2 }).AsTask().WaitAsync(TimeSpan.FromSeconds(30));
        Assert.False(call.Stalled);
        call.End();
    }

    /// <summary>Its first read completes with a message exactly when its token is cancelled; then the stream ends. Like a
    /// pipe, a read with a token already cancelled throws.</summary>
    private sealed class LateReader(byte[] message) : PipeReader
    {
        private int _reads;

        public override async ValueTask<ReadResult> ReadAsync(CancellationToken cancellationToken = default)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (++_reads > 1)
                return new ReadResult(ReadOnlySequence<byte>.Empty, isCanceled: false, isCompleted: true);
            var fired = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            using (cancellationToken.Register(() => fired.TrySetResult()))
                await fired.Task;
            return new ReadResult(new ReadOnlySequence<byte>(message), isCanceled: false, isCompleted: false);
        }

        public override bool TryRead(out ReadResult result)
        {
            result = default;
            return false;
        }

        public override void AdvanceTo(SequencePosition consumed) { }
        public override void AdvanceTo(SequencePosition consumed, SequencePosition examined) { }
        public override void CancelPendingRead() { }
        public override void Complete(Exception? exception = null) { }
    }

    /// <summary>Its first flush completes exactly when its token is cancelled; later ones at once. Like a pipe, a flush
    /// with a token already cancelled throws.</summary>
    private sealed class LateWriter : PipeWriter
    {
        private readonly byte[] _buffer = new byte[1 << 16];
        private int _flushes;

        public override async ValueTask<FlushResult> FlushAsync(CancellationToken cancellationToken = default)
        {
            cancellationToken.ThrowIfCancellationRequested();
            if (++_flushes > 1)
                return new FlushResult(isCanceled: false, isCompleted: false);
            var fired = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            using (cancellationToken.Register(() => fired.TrySetResult()))
                await fired.Task;
            return new FlushResult(isCanceled: false, isCompleted: false);
        }

        public override void Advance(int bytes) { }
        public override Memory<byte> GetMemory(int sizeHint = 0) => _buffer;
        public override Span<byte> GetSpan(int sizeHint = 0) => _buffer;
        public override void CancelPendingFlush() { }
        public override void Complete(Exception? exception = null) { }
    }

    private sealed class BodyPipe(PipeReader reader) : IRequestBodyPipeFeature
    {
        public PipeReader Reader => reader;
    }

    private sealed class ResponseBody(PipeWriter writer) : IHttpResponseBodyFeature
    {
        public Stream Stream => throw new NotSupportedException();
        public PipeWriter Writer => writer;
        public Task CompleteAsync() => Task.CompletedTask;
        public void DisableBuffering() { }
        public Task SendFileAsync(string path, long offset, long? count, CancellationToken cancellationToken = default) => throw new NotSupportedException();
        public Task StartAsync(CancellationToken cancellationToken = default) => Task.CompletedTask;
    }
}
