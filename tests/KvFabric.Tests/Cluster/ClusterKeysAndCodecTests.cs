using System.Text;
using KvFabric.Cluster;
using Xunit;

namespace KvFabric.Tests.Cluster;

public sealed class ClusterKeysAndCodecTests
{
    [Fact]
    public void Cluster_KeysFollowTheDocumentedLayout()
    {
        Assert.Equal("/kvfabric/prod/nodes/", ClusterKeys.NodesPrefix("prod"));
        Assert.Equal("/kvfabric/prod/nodes/node-a", ClusterKeys.NodeKey("prod", "node-a"));
        Assert.Throws<ArgumentException>(() => ClusterKeys.NodesPrefix(""));
        Assert.Throws<ArgumentException>(() => ClusterKeys.NodeKey("prod", "a/b"));
        Assert.Throws<ArgumentException>(() => ClusterKeys.NodeKey("prod", "a\nb"));
    }

    [Fact]
    public void Cluster_PrefixEndIsThePrefixWithItsLastByteIncremented()
    {
        Assert.Equal("/kvfabric/prod/nodes0", Encoding.UTF8.GetString(ClusterKeys.PrefixEnd("/kvfabric/prod/nodes/"u8)));
        Assert.Equal(new byte[] { 0x62 }, ClusterKeys.PrefixEnd([0x61, 0xff]));   // trailing 0xff bytes carry
        Assert.Equal(new byte[] { 0 }, ClusterKeys.PrefixEnd([0xff, 0xff]));      // everything: etcd's "\0"
    }

    [Fact]
    public void Cluster_NodeInfoRoundTripsThroughJson()
    {
        var info = new NodeInfo("node-a", "decode-3", "10.0.0.5:50051", [0, 1, 2, 250, 255], 0.625, ulong.MaxValue);
        byte[] json = NodeInfoCodec.Encode(info);
        string text = Encoding.UTF8.GetString(json);
        Assert.Contains("\"grpcEndpoint\":\"10.0.0.5:50051\"", text, StringComparison.Ordinal);
        Assert.Contains("\"agentMetadata\":\"AAEC+v8=\"", text, StringComparison.Ordinal);
        NodeInfo back = NodeInfoCodec.Decode(json);
        Assert.True(info.SameAs(back), $"{text} decoded to {back}");
        Assert.Equal(ulong.MaxValue, back.Incarnation);
    }

    [Fact]
    public void Cluster_NodeInfoDecodingIgnoresUnknownMembersAndNamesWhatIsWrong()
    {
        NodeInfo n = NodeInfoCodec.Decode("""{"node":"b","worker":"w","grpcEndpoint":"h:1","agentMetadata":"","load":1,"incarnation":2,"zone":"eu-1"}"""u8);
        Assert.Equal(("b", 1.0, 2UL), (n.Node, n.Load, n.Incarnation));
        Assert.Contains("\"node\"", Assert.Throws<FormatException>(() => NodeInfoCodec.Decode("""{"worker":"w"}"""u8)).Message, StringComparison.Ordinal);
        Assert.Throws<FormatException>(() => NodeInfoCodec.Decode("not json"u8));
        Assert.Throws<FormatException>(() => NodeInfoCodec.Decode("[1]"u8));
        Assert.Throws<ArgumentException>(() => NodeInfoCodec.Encode(n with { Load = double.PositiveInfinity }));
    }
}
