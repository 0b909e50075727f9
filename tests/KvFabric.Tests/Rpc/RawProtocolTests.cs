using System.IO.Compression;
using System.Net;
using System.Net.Http.Headers;
using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>The server's gRPC protocol handling seen from raw HTTP/2 requests (no gRPC client library in between).</summary>
public sealed class RawProtocolTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    private async Task<(HttpResponseMessage Response, byte[] Body)> SendAsync(string path, byte[] body, string contentType = "application/grpc",
        IReadOnlyDictionary<string, string>? headers = null)
    {
        using var http = new HttpClient(new SocketsHttpHandler()) { Timeout = TimeSpan.FromSeconds(20) };
        var request = new HttpRequestMessage(HttpMethod.Post, fx.Address + path)
        {
            Version = HttpVersion.Version20,
            VersionPolicy = HttpVersionPolicy.RequestVersionExact,
            Content = new ByteArrayContent(body),
        };
        request.Content.Headers.ContentType = MediaTypeHeaderValue.Parse(contentType);
        request.Headers.TE.Add(new TransferCodingWithQualityHeaderValue("trailers"));
        request.Headers.TryAddWithoutValidation("authorization", "Bearer alpha-token");
        request.Headers.TryAddWithoutValidation(GrpcProtocol.TenantHeader, "alpha");
        foreach (var (k, v) in headers ?? new Dictionary<string, string>())
            request.Headers.TryAddWithoutValidation(k, v);
        HttpResponseMessage response = await http.SendAsync(request);
        byte[] bytes = await response.Content.ReadAsByteArrayAsync();
        return (response, bytes);
    }

    private static byte[] Frame(byte[] payload, bool compressed = false)
    {
        var framed = new byte[5 + payload.Length];
        framed[0] = compressed ? (byte)1 : (byte)0;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(framed.AsSpan(1), (uint)payload.Length);
        payload.CopyTo(framed, 5);
        return framed;
    }

    private static (int Status, string Message) StatusOf(HttpResponseMessage r)
    {
        HttpHeaders source = r.TrailingHeaders.Contains(GrpcProtocol.StatusHeader) ? r.TrailingHeaders : r.Headers;
        int status = int.Parse(source.GetValues(GrpcProtocol.StatusHeader).First(), System.Globalization.CultureInfo.InvariantCulture);
        string message = source.TryGetValues(GrpcProtocol.MessageHeader, out var m) ? GrpcProtocol.DecodeMessage(m.First()) : string.Empty;
        return (status, message);
    }

    [Fact]
    public async Task The_server_enforces_grpc_timeout_itself()
    {
        // No client-side cancellation here: only the grpc-timeout header can end this never-ending stream.
        byte[] request = Frame(new SubscribeEventsRequest { FromSequence = ulong.MaxValue - 1 }.ToByteArray());
        var (response, _) = await SendAsync("/kvfabric.v1.Index/SubscribeEvents", request, headers: new Dictionary<string, string> { ["grpc-timeout"] = "200m" });
        Assert.Equal((int)StatusCode.DeadlineExceeded, StatusOf(response).Status);
    }

    [Fact]
    public async Task A_truncated_message_is_an_internal_error_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("truncated", 1);
        byte[] put = Frame(new PutRequest { Hash = ByteString.CopyFrom(chain[0]), BlockLength = (ulong)fx.BlockBytes, Data = ByteString.CopyFrom(new byte[fx.BlockBytes]) }.ToByteArray());
        var (response, _) = await SendAsync("/kvfabric.v1.Fabric/Put", put[..(put.Length / 2)]);
        var (status, message) = StatusOf(response);
        Assert.Equal((int)StatusCode.Internal, status);
        Assert.Contains("stream ended inside a message", message, StringComparison.Ordinal);
        using var client = fx.Client();
        Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
    }

    [Fact]
    public async Task Gzip_compressed_requests_are_accepted_and_unknown_encodings_refused()
    {
        byte[] payload = new LookupRequest { Hashes = ByteString.CopyFrom(new byte[32]) }.ToByteArray();
        using var buffer = new MemoryStream();
        using (var gzip = new GZipStream(buffer, CompressionLevel.Fastest, leaveOpen: true))
            gzip.Write(payload);
        var (ok, body) = await SendAsync("/kvfabric.v1.Fabric/Lookup", Frame(buffer.ToArray(), compressed: true),
            headers: new Dictionary<string, string> { ["grpc-encoding"] = "gzip" });
        Assert.Equal(0, StatusOf(ok).Status);
        Assert.Equal(0u, LookupResponse.Parser.ParseFrom(body.AsSpan(5)).MatchedBlocks);

        var (snappy, _) = await SendAsync("/kvfabric.v1.Fabric/Lookup", Frame(payload), headers: new Dictionary<string, string> { ["grpc-encoding"] = "snappy" });
        Assert.Equal((int)StatusCode.Unimplemented, StatusOf(snappy).Status);
        Assert.Contains("gzip", snappy.Headers.GetValues(GrpcProtocol.AcceptEncodingHeader).First(), StringComparison.Ordinal);

        var (unflagged, _) = await SendAsync("/kvfabric.v1.Fabric/Lookup", Frame(payload, compressed: true));
        Assert.Equal((int)StatusCode.Unimplemented, StatusOf(unflagged).Status);
    }

    [Fact]
    public async Task A_malformed_put_message_is_invalid_argument()
    {
        var (response, _) = await SendAsync("/kvfabric.v1.Fabric/Put", Frame([(1 << 3) | 2, 200, 1, 2, 3]));
        var (status, message) = StatusOf(response);
        Assert.Equal((int)StatusCode.InvalidArgument, status);
        Assert.Contains("malformed protobuf", message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Non_grpc_requests_get_415()
    {
        var (response, _) = await SendAsync("/kvfabric.v1.Fabric/Lookup", [1, 2, 3], contentType: "application/json");
        Assert.Equal(HttpStatusCode.UnsupportedMediaType, response.StatusCode);
    }

    [Fact]
    public async Task Metrics_are_served_in_prometheus_text_format()
    {
        using var client = fx.Client();
        await client.LookupAsync(TestBlocks.Packed(TestBlocks.Chain("metrics", 2)));
        using var http = new HttpClient();
        HttpResponseMessage r = await http.GetAsync($"http://{fx.Host.MetricsEndpoint}/metrics");
        string text = await r.Content.ReadAsStringAsync();
        Assert.Equal("text/plain", r.Content.Headers.ContentType?.MediaType);
        Assert.Contains("# TYPE kvfabric_rpc_calls_total counter", text, StringComparison.Ordinal);
        Assert.Contains("kvfabric_rpc_calls_total{method=\"/kvfabric.v1.Fabric/Lookup\",code=\"OK\"}", text, StringComparison.Ordinal);
        Assert.Contains("kvfabric_rpc_duration_seconds_bucket{method=\"/kvfabric.v1.Fabric/Lookup\",le=\"+Inf\"}", text, StringComparison.Ordinal);
        Assert.Contains("kvfabric_tier_capacity_bytes{tier=\"Host\"} " + (SidecarFixture.Capacity * fx.BlockBytes), text, StringComparison.Ordinal);
    }
}
