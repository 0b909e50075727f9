using Google.Protobuf;
using Grpc.Health.V1;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using KvFabric.Rpc.V1;
using Microsoft.AspNetCore.Http;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>Regressions for the review of the gRPC server and client.</summary>
public sealed class RpcReviewFixTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [Fact]
    public async Task A_deadline_too_long_for_a_timer_is_no_local_deadline()
    {
        using var client = fx.Client();
        // TimeSpan.MaxValue is a common way to say "no deadline"; timers hold at most ~49 days.
        Assert.Equal("node-a", (await client.StatsAsync(new CallOptions(Deadline: TimeSpan.MaxValue))).Node);
        await using var watch = client.WatchHealth(options: new CallOptions(Deadline: TimeSpan.FromDays(100)));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await watch.ReadAsync())?.Status);
    }

    [Fact]
    public async Task A_deadline_that_already_passed_is_deadline_exceeded()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("passed-deadline", 1);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 1));
        // A caller that computes what is left of its own budget can get a negative remainder.
        var e = await Assert.ThrowsAsync<RpcException>(() => client.GetAsync(TestBlocks.Packed(chain), new byte[fx.BlockBytes], fx.BlockBytes,
            options: new CallOptions(Deadline: TimeSpan.FromSeconds(-1))));
        Assert.Equal(StatusCode.DeadlineExceeded, e.Status);
        await using var watch = client.WatchHealth(options: new CallOptions(Deadline: TimeSpan.FromMilliseconds(-5)));
        Assert.Equal(StatusCode.DeadlineExceeded, (await Assert.ThrowsAsync<RpcException>(async () => await watch.ReadAsync())).Status);
    }

    /// <summary>A response body whose client reset the stream: the first bytes sent find it gone.</summary>
    private sealed class GoneClient(CancellationTokenSource aborted) : TestStream
    {
        public override bool CanWrite => true;
        public override void Write(byte[] buffer, int offset, int count) => Gone();
        public override ValueTask WriteAsync(ReadOnlyMemory<byte> buffer, CancellationToken cancellationToken = default) => throw Gone();
        public override Task WriteAsync(byte[] buffer, int offset, int count, CancellationToken cancellationToken) => throw Gone();

        private IOException Gone()
        {
            aborted.Cancel();
            throw new IOException("the client reset the stream");
        }
    }

    /// <summary>Runs one unary call of alpha's through the sidecar's own routes, to a client that is gone when the answer is sent.</summary>
    private async Task CallWithClientGoneAsync(string method, IMessage request)
    {
        using var aborted = new CancellationTokenSource();
        await CallAsync(fx.Host.Router, method, request, new GoneClient(aborted), aborted);
        Assert.True(aborted.IsCancellationRequested, "the handler never answered");
    }

    /// <summary>Runs one unary call of alpha's through a router in process (no HTTP/2 in between); returns its context.</summary>
    private static async Task<HttpContext> CallAsync(GrpcRouter router, string method, IMessage request, Stream responseBody, CancellationTokenSource aborted)
    {
        var dispatcher = new GrpcDispatcher(router, new TenantRegistry([new TenantConfig("alpha", "alpha-token")]), new MetricsRegistry(),
            NullLogger.Instance, 1 << 20);
        var http = new DefaultHttpContext { RequestAborted = aborted.Token };
        http.Request.Method = "POST";
        http.Request.ContentType = GrpcProtocol.ContentType;
        http.Request.Path = method;
        http.Request.Headers.Authorization = "Bearer alpha-token";
        http.Request.Headers[GrpcProtocol.TenantHeader] = "alpha";
        byte[] payload = request.ToByteArray();
        var framed = new byte[5 + payload.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(framed.AsSpan(1), (uint)payload.Length);
        payload.CopyTo(framed, 5);
        http.Request.Body = new MemoryStream(framed);
        http.Response.Body = responseBody;
        await dispatcher.HandleAsync(http);
        return http;
    }

    [Fact]
    public async Task A_reservation_whose_answer_cannot_be_delivered_is_released()
    {
        int free = fx.Host.Staging.Available;
        await CallWithClientGoneAsync("/kvfabric.v1.Fabric/Reserve", new ReserveRequest { Blocks = 4, LeaseMs = 3_600_000 });
        // Nobody knows the reservation's id: its slots must not stay taken for the hour of its lease.
        Assert.Equal(free, fx.Host.Staging.Available);
    }

    [Fact]
    public async Task A_pin_whose_answer_cannot_be_delivered_is_undone()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("undelivered-pin", 1);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 5));
        await CallWithClientGoneAsync("/kvfabric.v1.Fabric/Pin", new PinRequest { Hashes = ByteString.CopyFrom(TestBlocks.Packed(chain)), LeaseMs = 3_600_000 });
        // Nobody can Unpin a lease whose id never arrived: the block must not stay undeletable for an hour.
        Assert.Equal(1u, (await client.DeleteAsync(TestBlocks.Packed(chain))).Deleted);
    }

    [Fact]
    public async Task Route_without_a_live_member_is_unavailable_and_says_why()
    {
        // A clustered node that has not joined yet (its gRPC server starts first) or whose own lease lapsed knows no member.
        await using var cluster = new KvFabric.Cluster.ClusterNode(new KvFabric.Cluster.InProcessClusterStore("route-empty"),
            KvFabric.Cluster.ClusterFactory.CreateIndex(new MetricsRegistry()),
            new KvFabric.Cluster.ClusterNodeOptions { Node = "n", Worker = "w", ClusterTenant = "alpha", ClusterToken = "alpha-token", Tenants = ["alpha"] },
            fx.Host.Agent, fx.Host.Store, fx.Host.Staging, () => 0, NullLogger.Instance);
        var router = new GrpcRouter();
        new IndexService(fx.Host.Store, "w", () => 0, cluster: cluster).Register(router);
        using var aborted = new CancellationTokenSource();
        HttpContext http = await CallAsync(router, "/kvfabric.v1.Index/Route",
            new RouteRequest { Hashes = ByteString.CopyFrom(TestBlocks.Packed(TestBlocks.Chain("route-empty", 1))) }, new MemoryStream(), aborted);
        Assert.Equal(((int)StatusCode.Unavailable).ToString(System.Globalization.CultureInfo.InvariantCulture), http.Response.Headers[GrpcProtocol.StatusHeader].ToString());
        Assert.Contains("no live member", GrpcProtocol.DecodeMessage(http.Response.Headers[GrpcProtocol.MessageHeader].ToString()), StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_failed_put_never_undoes_a_block_a_concurrent_put_reported_as_stored()
    {
        // Half the Puts carry the chain plus a block whose parent is absent (FAILED_PRECONDITION: theirs is undone), half
        // the chain alone (OK). An OK Put that found the chain already placed by a failing one must still find it after.
        for (int round = 0; round < 40; round++)
        {
            var chain = TestBlocks.Chain($"concurrent-undo-{round}", 4);
            var orphan = new BlockToPut(TestBlocks.Chain($"concurrent-undo-orphan-{round}", 1)[0], TestBlocks.Chain("concurrent-undo-absent", 1)[0], 9,
                new byte[fx.BlockBytes]);
            var clients = Enumerable.Range(0, 8).Select(_ => fx.Client()).ToArray();
            try
            {
                StatusCode[] statuses = await Task.WhenAll(clients.Select(async (client, i) =>
                {
                    var blocks = TestBlocks.ToPut(chain, fx.BlockBytes, 1);
                    try
                    {
                        await client.PutAsync(i % 2 == 0 ? blocks.Append(orphan) : blocks);
                        return StatusCode.OK;
                    }
                    catch (RpcException e)
                    {
                        return e.Status;
                    }
                }));
                Assert.Equal(4, statuses.Count(s => s == StatusCode.OK));
                Assert.Equal(4u, (await clients[0].LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
                await clients[0].DeleteAsync(TestBlocks.Packed(chain)); // keep the fixture's small cache clear
            }
            finally
            {
                foreach (var client in clients)
                    client.Dispose();
            }
        }
    }
}
