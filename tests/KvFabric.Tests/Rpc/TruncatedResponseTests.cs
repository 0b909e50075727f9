using System.Net;
using System.Net.Http.Headers;
using Google.Protobuf;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>A Get response that ends (cleanly, with grpc-status 0) inside a message: the client must call it INTERNAL.</summary>
public sealed class TruncatedResponseTests
{
    private const int BlockBytes = 4096;

    /// <summary>Answers every call with the given body and grpc-status 0 in the trailers (a proxy or server that cut a message short).</summary>
    private sealed class CannedResponse(byte[] body) : HttpMessageHandler
    {
        protected override Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken)
        {
            var response = new HttpResponseMessage(HttpStatusCode.OK) { Version = HttpVersion.Version20, Content = new ByteArrayContent(body) };
            response.Content.Headers.ContentType = new MediaTypeHeaderValue(GrpcProtocol.ContentType);
            response.TrailingHeaders.TryAddWithoutValidation(GrpcProtocol.StatusHeader, "0");
            return Task.FromResult(response);
        }
    }

    [Theory]
    [InlineData(100)] // inside the block's data
    [InlineData(4 + BlockBytes)] // inside the fields before the data
    public async Task A_get_response_cut_inside_a_message_is_internal_not_unavailable(int cut)
    {
        byte[] hash = TestBlocks.Chain("truncated-response", 1)[0];
        byte[] frame = GrpcFraming.ToFrame(new GetResponse
        {
            Hash = ByteString.CopyFrom(hash), BlockLength = BlockBytes, Tier = Tier.Host, Data = ByteString.CopyFrom(new byte[BlockBytes]),
        });
        using var handler = new CannedResponse(frame[..(frame.Length - cut)]);
        using var client = new FabricClient(new RpcChannelOptions { Address = new Uri("http://127.0.0.1:1"), Handler = handler });
        var e = await Assert.ThrowsAsync<RpcException>(() => client.GetAsync(hash, new byte[BlockBytes], BlockBytes));
        Assert.Equal(StatusCode.Internal, e.Status);
        Assert.Contains("ended inside a message", e.Detail, StringComparison.Ordinal);
    }
}
