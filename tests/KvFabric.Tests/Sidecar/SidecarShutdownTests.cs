using System.Diagnostics;
using System.Net;
using System.Net.Http.Headers;
using Google.Protobuf;
using Grpc.Health.V1;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Sidecar;
using KvFabric.Tests.Rpc;
using Xunit;

namespace KvFabric.Tests.Sidecar;

/// <summary>
/// SIGTERM to a real `kvfabric serve` while calls run: every call ends with a status a client can act on (UNAVAILABLE:
/// go to another node), never CANCELLED (the client cancelled) or a cut connection, as seen by FabricClient and by a raw
/// HTTP/2 gRPC client.
/// </summary>
[Collection("multi-process")]
public sealed class SidecarShutdownTests
{
    private static readonly int BlockBytes = (int)SidecarFixture.SmallLayout.BlockBytes;

    private static Dictionary<string, string> Env(string model, double drainSeconds)
    {
        var env = TestBlocks.SmallLayoutEnv(model);
        env["KVFABRIC_SHUTDOWN_DRAIN_S"] = drainSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture);
        return env;
    }

    private static FabricClient Client(string address, HttpMessageHandler? handler = null) =>
        new(new RpcChannelOptions { Address = new Uri(address), Tenant = "dev", Token = "dev", Handler = handler, RetryBackoff = TimeSpan.FromMilliseconds(20) });

    private static HttpRequestMessage RawRequest(string address, string path, HttpContent content)
    {
        var request = new HttpRequestMessage(HttpMethod.Post, address + path)
        {
            Version = HttpVersion.Version20, VersionPolicy = HttpVersionPolicy.RequestVersionExact, Content = content,
        };
        request.Content.Headers.ContentType = MediaTypeHeaderValue.Parse("application/grpc");
        request.Headers.TE.Add(new TransferCodingWithQualityHeaderValue("trailers"));
        request.Headers.TryAddWithoutValidation("authorization", "Bearer dev");
        request.Headers.TryAddWithoutValidation(GrpcProtocol.TenantHeader, "dev");
        return request;
    }

    private static byte[] Frame(IMessage message)
    {
        byte[] payload = message.ToByteArray();
        var framed = new byte[5 + payload.Length];
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(framed.AsSpan(1), (uint)payload.Length);
        payload.CopyTo(framed, 5);
        return framed;
    }

    /// <summary>The grpc-status (and message) a raw client sees once it read the whole response.</summary>
    private static async Task<(int Status, string Message)> RawStatusAsync(HttpResponseMessage response)
    {
        await response.Content.CopyToAsync(Stream.Null).WaitAsync(TimeSpan.FromSeconds(30));
        HttpHeaders source = response.TrailingHeaders.Contains(GrpcProtocol.StatusHeader) ? response.TrailingHeaders : response.Headers;
        Assert.True(source.Contains(GrpcProtocol.StatusHeader), $"no grpc-status (HTTP {(int)response.StatusCode})");
        int status = int.Parse(source.GetValues(GrpcProtocol.StatusHeader).First(), System.Globalization.CultureInfo.InvariantCulture);
        string message = source.TryGetValues(GrpcProtocol.MessageHeader, out var m) ? GrpcProtocol.DecodeMessage(m.First()) : string.Empty;
        return (status, message);
    }

    private static async Task<RpcException> FailsAsync(Func<Task> call, string what)
    {
        var e = await Assert.ThrowsAsync<RpcException>(() => call().WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.True(e.Status == StatusCode.Unavailable, $"{what}: {e.Status} {e.Detail}");
        return e;
    }

    private static PutRequest Block(byte[][] chain, int i, int seed) => new()
    {
        Hash = ByteString.CopyFrom(chain[i]), ParentHash = i == 0 ? ByteString.Empty : ByteString.CopyFrom(chain[i - 1]),
        Depth = (uint)i, BlockLength = (ulong)BlockBytes, Data = ByteString.CopyFrom(TestBlocks.Bytes(BlockBytes, seed + i)),
    };

    [Fact]
    public async Task Sigterm_ends_watch_streams_at_once_with_unavailable_and_they_do_not_hold_the_stop()
    {
        // A drain period far longer than the test allows the stop: only calls doing work may use it.
        var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1"], Env("shutdown-watch-model", 60));
        await using var _ = sidecar;
        using var client = Client(sidecar.GrpcAddress);
        await using var watch = client.WatchHealth();
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await watch.ReadAsync())?.Status);
        await using var events = client.SubscribeEvents(1);
        using var http = new HttpClient(new SocketsHttpHandler()) { Timeout = Timeout.InfiniteTimeSpan };
        using HttpResponseMessage raw = await http.SendAsync(RawRequest(sidecar.GrpcAddress, "/kvfabric.v1.Index/SubscribeEvents",
            new ByteArrayContent(Frame(new SubscribeEventsRequest { FromSequence = 1 }))), HttpCompletionOption.ResponseHeadersRead);
        Assert.Equal(HttpStatusCode.OK, raw.StatusCode);
        Task<KvEvent?> firstEvent = events.ReadAsync().AsTask(); // waits: nothing happens on this node

        var clock = Stopwatch.StartNew();
        Task<int> stopped = sidecar.StopAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, (await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);
        RpcException watchEnd = await FailsAsync(async () => await watch.ReadAsync(), "health Watch");
        Assert.Contains("shutting down", watchEnd.Detail, StringComparison.Ordinal);
        RpcException eventsEnd = await FailsAsync(() => firstEvent, "SubscribeEvents (FabricClient)");
        Assert.Contains("another node", eventsEnd.Detail, StringComparison.Ordinal);
        var (status, message) = await RawStatusAsync(raw);
        Assert.True(status == (int)StatusCode.Unavailable, $"SubscribeEvents (raw HTTP/2): {status} {message}");

        int code = await stopped;
        Assert.True(code == 0, $"exit code {code}; log:\n{sidecar.Log}");
        Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"the stop took {clock.Elapsed}: the watch streams held it (drain period 60 s)");
    }

    [Fact]
    public async Task Sigterm_gives_running_calls_the_drain_period_then_ends_them_unavailable_and_refuses_new_calls()
    {
        string ssd = Directory.CreateTempSubdirectory("kvfabric-shutdown-").FullName;
        try
        {
            var env = Env("shutdown-work-model", 3);
            env["KVFABRIC_SSD_DIR"] = ssd;
            env["KVFABRIC_SSD_CAPACITY"] = "4MiB";
            env["KVFABRIC_WRITE_THROUGH"] = "true"; // what a Put stores is on the SSD, so a restart shows it
            env["KVFABRIC_PUT_STAGING_BLOCKS"] = "256";
            byte[][] finished = TestBlocks.Chain("shutdown-finished", 2), cut = TestBlocks.Chain("shutdown-cut", 2), rawCut = TestBlocks.Chain("shutdown-raw-cut", 1);
            byte[][] read = TestBlocks.Chain("shutdown-read", 128);
            var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1"], env);
            await using (sidecar)
            {
                using var client = Client(sidecar.GrpcAddress);
                Assert.Equal(128u, (await client.PutAsync(TestBlocks.ToPut(read, BlockBytes, 7))).Stored);

                // A Get the client does not read: 512 KiB wait behind a 64 KiB HTTP/2 window, so the call is still running.
                using var slowClient = Client(sidecar.GrpcAddress, new SocketsHttpHandler());
                await using var get = slowClient.GetStream(new GetRequest { Hashes = ByteString.CopyFrom(TestBlocks.Packed(read)), ChunkBytes = 4096 },
                    new CallOptions(Deadline: TimeSpan.FromMinutes(2)));
                // Two Puts in progress (FabricClient): one finishes within the drain period, one never does.
                await using var putFinished = client.Channel.Streaming<PutRequest, PutResponse>("/kvfabric.v1.Fabric/Put", PutResponse.Parser);
                await putFinished.WriteAsync(Block(finished, 0, 1));
                await using var putCut = client.Channel.Streaming<PutRequest, PutResponse>("/kvfabric.v1.Fabric/Put", PutResponse.Parser);
                await putCut.WriteAsync(Block(cut, 0, 2));
                await putCut.WriteAsync(Block(cut, 1, 2));
                // And one from a raw HTTP/2 client.
                var rawBody = new System.IO.Pipelines.Pipe();
                using var http = new HttpClient(new SocketsHttpHandler()) { Timeout = Timeout.InfiniteTimeSpan };
                Task<HttpResponseMessage> rawPut = http.SendAsync(RawRequest(sidecar.GrpcAddress, "/kvfabric.v1.Fabric/Put",
                    new StreamContent(rawBody.Reader.AsStream())), HttpCompletionOption.ResponseHeadersRead);
                await rawBody.Writer.WriteAsync(Frame(Block(rawCut, 0, 3)));
                await Task.Delay(500); // every call has reached the server

                Task<int> stopped = sidecar.StopAsync(TimeSpan.FromSeconds(60));
                await Task.Delay(500);
                // Work within the drain period finishes and is kept.
                await putFinished.WriteAsync(Block(finished, 1, 1));
                Assert.Equal(2u, (await putFinished.ResponseAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30))).Stored);

                // New calls are refused: UNAVAILABLE (on a connection that took the GOAWAY, a new one is refused), not retried forever.
                var refusing = Stopwatch.StartNew();
                await FailsAsync(() => client.LookupAsync(TestBlocks.Packed(finished), new CallOptions(Deadline: TimeSpan.FromSeconds(2))), "a new Lookup (FabricClient)");
                Assert.True(refusing.Elapsed < TimeSpan.FromSeconds(10), $"the refused Lookup took {refusing.Elapsed}");
                using var fresh = Client(sidecar.GrpcAddress);
                await FailsAsync(() => fresh.StatsAsync(), "a new Stats on a new FabricClient");
                using var rawFresh = new HttpClient(new SocketsHttpHandler()) { Timeout = TimeSpan.FromSeconds(30) };
                try
                {
                    using HttpResponseMessage r = await rawFresh.SendAsync(RawRequest(sidecar.GrpcAddress, "/kvfabric.v1.Fabric/Lookup",
                        new ByteArrayContent(Frame(new LookupRequest { Hashes = ByteString.CopyFrom(TestBlocks.Packed(finished)) }))));
                    var (status, message) = await RawStatusAsync(r);
                    Assert.True(status == (int)StatusCode.Unavailable, $"a new raw Lookup: {status} {message}");
                }
                catch (HttpRequestException)
                {
                    // The listener is closed: the connection is refused, which gRPC clients report as UNAVAILABLE.
                }

                // After the drain period (3 s), what still runs ends as UNAVAILABLE, and a cut Put stores nothing.
                RpcException putEnd = await FailsAsync(async () => await putCut.ReadAsync(), "a Put in progress (FabricClient)");
                Assert.Contains("drain period", putEnd.Detail, StringComparison.Ordinal);
                using HttpResponseMessage rawPutResponse = await rawPut.WaitAsync(TimeSpan.FromSeconds(30));
                var (rawStatus, rawMessage) = await RawStatusAsync(rawPutResponse);
                Assert.True(rawStatus == (int)StatusCode.Unavailable, $"a Put in progress (raw HTTP/2): {rawStatus} {rawMessage}");
                await rawBody.Writer.CompleteAsync();
                int blocks = 0;
                RpcException getEnd = await FailsAsync(async () =>
                {
                    while (await get.ReadAsync() is not null)
                        blocks++;
                }, "a Get being read (FabricClient)");
                Assert.True(blocks > 0, $"the Get sent nothing before it ended: {getEnd.Detail}");

                int code = await stopped;
                Assert.True(code == 0, $"exit code {code}; log:\n{sidecar.Log}");
            }

            // A restart on the same SSD: the Put that finished is there, the ones cut off left nothing.
            var again = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1"], env);
            await using (again)
            {
                using var client = Client(again.GrpcAddress);
                Assert.Equal(2u, (await client.LookupAsync(TestBlocks.Packed(finished))).MatchedBlocks);
                Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(cut))).MatchedBlocks);
                Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(rawCut))).MatchedBlocks);
            }
        }
        finally
        {
            Directory.Delete(ssd, recursive: true);
        }
    }
}
