using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using KvFabric.Rpc.V1;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Http.Features;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>
/// A client that is alive but stopped sending (a Put) or reading (a Get) must not hold what its call holds (staged
/// blocks, read leases) for as long as its connection lasts: each read or flush waits at most the stall timeout.
/// Driven through the sidecar's own routes in process, so the "client" can stall exactly where the test wants.
/// </summary>
public sealed class StreamStallTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    private static readonly TimeSpan Stall = TimeSpan.FromSeconds(1);

    [Fact]
    public async Task A_put_whose_client_stops_sending_ends_with_deadline_exceeded_and_keeps_nothing()
    {
        var chain = TestBlocks.Chain("stalled-put", 2);
        byte[] first = Frame(new PutRequest
        {
            Hash = ByteString.CopyFrom(chain[0]), BlockLength = (ulong)fx.BlockBytes, Data = ByteString.CopyFrom(new byte[fx.BlockBytes]),
        });
        byte[] secondHalf = Frame(new PutRequest
        {
            Hash = ByteString.CopyFrom(chain[1]), ParentHash = ByteString.CopyFrom(chain[0]), Depth = 1, BlockLength = (ulong)fx.BlockBytes,
            Data = ByteString.CopyFrom(new byte[fx.BlockBytes / 2]),
        });
        var lifetime = new Lifetime();
        HttpContext http = await CallAsync("/kvfabric.v1.Fabric/Put", new StallingRequest([.. first, .. secondHalf]), new MemoryStream(), lifetime)
            .WaitAsync(TimeSpan.FromSeconds(30));

        Assert.Equal(((int)StatusCode.DeadlineExceeded).ToString(System.Globalization.CultureInfo.InvariantCulture), http.Response.Headers[GrpcProtocol.StatusHeader].ToString());
        Assert.Contains("stream_stall_timeout_s", GrpcProtocol.DecodeMessage(http.Response.Headers[GrpcProtocol.MessageHeader].ToString()), StringComparison.Ordinal);
        Assert.False(lifetime.Aborted, "a stalled request stream gets its status; only a stalled response stream is reset");
        using var client = fx.Client();
        Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
    }

    [Fact]
    public async Task A_get_whose_client_stops_reading_is_reset_and_releases_its_blocks()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("stalled-get", 1);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 3));
        var lifetime = new Lifetime();
        var body = new StalledReader();
        var call = CallAsync("/kvfabric.v1.Fabric/Get", new MemoryStream(Frame(new GetRequest { Hashes = ByteString.CopyFrom(TestBlocks.Packed(chain)) })),
            body, lifetime);
        await body.Writing.Task.WaitAsync(TimeSpan.FromSeconds(30));
        // While the flush waits, the Get holds the block: Delete refuses a block in use.
        var held = await Assert.ThrowsAsync<RpcException>(() => client.DeleteAsync(TestBlocks.Packed(chain)));
        Assert.Equal(StatusCode.FailedPrecondition, held.Status);

        await call.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.True(lifetime.Aborted, "a response stream whose client stopped reading must be reset (RST_STREAM)");
        Assert.Equal(1u, (await client.DeleteAsync(TestBlocks.Packed(chain))).Deleted);
    }

    private async Task<HttpContext> CallAsync(string method, Stream requestBody, Stream responseBody, Lifetime lifetime)
    {
        var dispatcher = new GrpcDispatcher(fx.Host.Router, new TenantRegistry([new TenantConfig("alpha", "alpha-token")]), new MetricsRegistry(),
            NullLogger.Instance, 1 << 20) { StreamStallTimeout = Stall };
        var http = new DefaultHttpContext();
        http.Features.Set<IHttpRequestLifetimeFeature>(lifetime);
        http.Request.Method = "POST";
        http.Request.ContentType = GrpcProtocol.ContentType;
        http.Request.Path = method;
        http.Request.Headers.Authorization = "Bearer alpha-token";
        http.Request.Headers[GrpcProtocol.TenantHeader] = "alpha";
        http.Request.Body = requestBody;
        http.Response.Body = responseBody;
        await dispatcher.HandleAsync(http);
        return http;
    }

    private static byte[] Frame(IMessage message) => GrpcFraming.ToFrame(message);

    private sealed class Lifetime : IHttpRequestLifetimeFeature
    {
        public CancellationToken RequestAborted { get; set; }
        public bool Aborted { get; private set; }
        public void Abort() => Aborted = true;
    }

    /// <summary>A request body that delivers its bytes, then neither more nor its end: a client that stopped sending.</summary>
    private sealed class StallingRequest(byte[] bytes) : TestStream
    {
        private int _position;
        public override bool CanRead => true;
        public override int Read(byte[] buffer, int offset, int count) => throw new NotSupportedException("async only");

        public override async ValueTask<int> ReadAsync(Memory<byte> buffer, CancellationToken cancellationToken = default)
        {
            if (_position < bytes.Length)
            {
                int n = Math.Min(buffer.Length, bytes.Length - _position);
                bytes.AsMemory(_position, n).CopyTo(buffer);
                _position += n;
                return n;
            }

            await Task.Delay(Timeout.Infinite, cancellationToken);
            return 0;
        }

        public override Task<int> ReadAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            ReadAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();
    }

    /// <summary>A response body whose writes never complete until cancelled: a client that stopped reading.</summary>
    private sealed class StalledReader : TestStream
    {
        public readonly TaskCompletionSource Writing = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public override bool CanWrite => true;
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException("async only");

        public override async ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default)
        {
            Writing.TrySetResult();
            await Task.Delay(Timeout.Infinite, cancellationToken);
        }

        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) =>
            WriteAsync(buffer.AsMemory(offset, count), cancellationToken).AsTask();
    }
}
