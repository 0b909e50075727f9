using System.IO.Compression;
using System.Net;
using System.Net.Http.Headers;
using Google.Protobuf;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>Bad input gets its precise status and changes nothing: checked by looking at the store afterwards.</summary>
public sealed class BadInputChangesNothingTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    private async Task<(int Status, string Message)> SendAsync(string path, byte[] body, IReadOnlyDictionary<string, string>? headers = null,
        string tenant = "alpha", string token = "alpha-token")
    {
        using var http = new HttpClient(new SocketsHttpHandler()) { Timeout = TimeSpan.FromSeconds(30) };
        var request = new HttpRequestMessage(HttpMethod.Post, fx.Address + path)
        {
            Version = HttpVersion.Version20,
            VersionPolicy = HttpVersionPolicy.RequestVersionExact,
            Content = new ByteArrayContent(body),
        };
        request.Content.Headers.ContentType = MediaTypeHeaderValue.Parse(GrpcProtocol.ContentType);
        request.Headers.TE.Add(new TransferCodingWithQualityHeaderValue("trailers"));
        request.Headers.TryAddWithoutValidation("authorization", "Bearer " + token);
        request.Headers.TryAddWithoutValidation(GrpcProtocol.TenantHeader, tenant);
        foreach (var (k, v) in headers ?? new Dictionary<string, string>())
            request.Headers.TryAddWithoutValidation(k, v);
        using HttpResponseMessage response = await http.SendAsync(request);
        await response.Content.ReadAsByteArrayAsync();
        HttpHeaders source = response.TrailingHeaders.Contains(GrpcProtocol.StatusHeader) ? response.TrailingHeaders : response.Headers;
        int status = int.Parse(source.GetValues(GrpcProtocol.StatusHeader).First(), System.Globalization.CultureInfo.InvariantCulture);
        string message = source.TryGetValues(GrpcProtocol.MessageHeader, out var m) ? GrpcProtocol.DecodeMessage(m.First()) : string.Empty;
        return (status, message);
    }

    private static byte[] Frame(byte[] payload, bool compressed = false, uint? claimedLength = null)
    {
        var framed = new byte[5 + payload.Length];
        framed[0] = compressed ? (byte)1 : (byte)0;
        System.Buffers.Binary.BinaryPrimitives.WriteUInt32BigEndian(framed.AsSpan(1), claimedLength ?? (uint)payload.Length);
        payload.CopyTo(framed, 5);
        return framed;
    }

    private static byte[] Gzip(byte[] payload)
    {
        using var buffer = new MemoryStream();
        using (var gzip = new GZipStream(buffer, CompressionLevel.Fastest, leaveOpen: true))
            gzip.Write(payload);
        return buffer.ToArray();
    }

    /// <summary>A chain's first block as one Put message: hash, block_length and all its bytes.</summary>
    private byte[] FirstBlock(byte[][] chain) => new PutRequest
    {
        Hash = ByteString.CopyFrom(chain[0]), BlockLength = (ulong)fx.BlockBytes, Data = ByteString.CopyFrom(TestBlocks.Bytes(fx.BlockBytes, 1)),
    }.ToByteArray();

    private PutRequest SecondBlock(byte[][] chain) => new()
    {
        Hash = ByteString.CopyFrom(chain[1]), ParentHash = ByteString.CopyFrom(chain[0]), Depth = 1, BlockLength = (ulong)fx.BlockBytes,
        Data = ByteString.CopyFrom(TestBlocks.Bytes(fx.BlockBytes, 2)),
    };

    private async Task AssertNothingStoredAsync(byte[][] chain, string tenant = "alpha")
    {
        using var client = fx.Client(tenant);
        Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
    }

    private static byte[] Concat(params byte[][] frames) => frames.SelectMany(f => f).ToArray();

    [Fact]
    public async Task A_put_message_over_the_size_limit_is_resource_exhausted_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("bad-over-limit", 2);
        // The second message's prefix claims 1 MiB; the fixture's limit is 256 KiB.
        var (status, message) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), Frame([1, 2, 3], claimedLength: 1 << 20)));
        Assert.Equal((int)StatusCode.ResourceExhausted, status);
        Assert.Contains("larger than the limit", message, StringComparison.Ordinal);
        await AssertNothingStoredAsync(chain);
    }

    [Fact]
    public async Task A_gzip_put_message_that_inflates_over_the_limit_is_resource_exhausted_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("bad-gzip-bomb", 2);
        PutRequest second = SecondBlock(chain);
        second.Data = ByteString.CopyFrom(new byte[300 * 1024]); // a few hundred bytes compressed; over 256 KiB inflated
        var (status, _) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), Frame(Gzip(second.ToByteArray()), compressed: true)),
            new Dictionary<string, string> { ["grpc-encoding"] = "gzip" });
        Assert.Equal((int)StatusCode.ResourceExhausted, status);
        await AssertNothingStoredAsync(chain);
    }

    [Fact]
    public async Task A_compressed_put_message_without_a_supported_encoding_is_unimplemented_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("bad-compressed-flag", 2);
        byte[] second = Frame(Gzip(SecondBlock(chain).ToByteArray()), compressed: true);
        var (unflagged, _) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), second));
        Assert.Equal((int)StatusCode.Unimplemented, unflagged);
        await AssertNothingStoredAsync(chain);
        var (snappy, _) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), second),
            new Dictionary<string, string> { ["grpc-encoding"] = "snappy" });
        Assert.Equal((int)StatusCode.Unimplemented, snappy);
        await AssertNothingStoredAsync(chain);
    }

    [Fact]
    public async Task A_malformed_put_message_after_a_good_block_is_invalid_argument_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("bad-protobuf", 2);
        // A hash field that claims 200 bytes where 3 follow.
        var (status, message) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), Frame([(1 << 3) | 2, 200, 1, 2, 3])));
        Assert.Equal((int)StatusCode.InvalidArgument, status);
        Assert.Contains("malformed protobuf", message, StringComparison.Ordinal);
        await AssertNothingStoredAsync(chain);
    }

    [Fact]
    public async Task A_truncated_put_stream_after_a_good_block_is_internal_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("bad-truncated", 2);
        byte[] second = Frame(SecondBlock(chain).ToByteArray());
        var (status, _) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), second[..(second.Length - 7)]));
        Assert.Equal((int)StatusCode.Internal, status);
        await AssertNothingStoredAsync(chain);
    }

    [Fact]
    public async Task Hashes_of_the_wrong_length_in_a_put_are_invalid_argument_and_store_nothing()
    {
        var chain = TestBlocks.Chain("bad-hash-length", 2);
        PutRequest shortHash = SecondBlock(chain);
        shortHash.Hash = ByteString.CopyFrom(chain[1].AsSpan(0, 15));
        var (status, message) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), Frame(shortHash.ToByteArray())));
        Assert.Equal((int)StatusCode.InvalidArgument, status);
        Assert.Contains("16-byte block hash", message, StringComparison.Ordinal);
        await AssertNothingStoredAsync(chain);

        PutRequest longParent = SecondBlock(chain);
        longParent.ParentHash = ByteString.CopyFrom([.. chain[0], 0]);
        (status, message) = await SendAsync("/kvfabric.v1.Fabric/Put", Concat(Frame(FirstBlock(chain)), Frame(longParent.ToByteArray())));
        Assert.Equal((int)StatusCode.InvalidArgument, status);
        Assert.Contains("parent_hash", message, StringComparison.Ordinal);
        await AssertNothingStoredAsync(chain);
    }

    [Fact]
    public async Task A_put_with_a_bad_token_or_for_another_tenant_is_refused_and_stores_nothing()
    {
        var chain = TestBlocks.Chain("bad-auth", 2);
        byte[] body = Concat(Frame(FirstBlock(chain)), Frame(SecondBlock(chain).ToByteArray()));
        Assert.Equal((int)StatusCode.Unauthenticated, (await SendAsync("/kvfabric.v1.Fabric/Put", body, token: "not-a-token")).Status);
        Assert.Equal((int)StatusCode.Unauthenticated, (await SendAsync("/kvfabric.v1.Fabric/Put", body, token: "")).Status);
        Assert.Equal((int)StatusCode.PermissionDenied, (await SendAsync("/kvfabric.v1.Fabric/Put", body, tenant: "beta")).Status);
        Assert.Equal((int)StatusCode.PermissionDenied, (await SendAsync("/kvfabric.v1.Fabric/Put", body, tenant: "gamma")).Status);
        await AssertNothingStoredAsync(chain, "alpha");
        await AssertNothingStoredAsync(chain, "beta");
    }

    [Fact]
    public async Task A_get_with_one_block_missing_is_not_found_and_writes_nothing()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("bad-get-missing", 2);
        await client.PutAsync(TestBlocks.ToPut(chain[..1], fx.BlockBytes, 11)); // the first block is there, the second is not
        var destination = new byte[2 * fx.BlockBytes];
        Array.Fill(destination, (byte)0xA5);
        var e = await Assert.ThrowsAsync<RpcException>(() => client.GetAsync(TestBlocks.Packed(chain), destination, fx.BlockBytes));
        Assert.Equal(StatusCode.NotFound, e.Status);
        Assert.All(destination, b => Assert.Equal(0xA5, b));
        Assert.Equal(1u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
    }

    [Fact]
    public async Task A_reservation_over_the_free_slots_is_resource_exhausted_and_takes_none()
    {
        using var client = fx.Client("beta");
        int free = fx.Host.Staging.Available;
        var e = await Assert.ThrowsAsync<RpcException>(() => client.ReserveAsync((uint)free + 1));
        Assert.Equal(StatusCode.ResourceExhausted, e.Status);
        Assert.Equal(free, fx.Host.Staging.Available);
    }
}
