using System.Net;
using System.Net.Sockets;
using KvFabric.Cluster;
using Xunit;
using static KvFabric.Tests.Cluster.ClusterNodes;

namespace KvFabric.Tests.Cluster;

/// <summary>The contract against a real etcd (one per class; each test its own cluster name), plus etcd's failure cases.</summary>
public sealed class EtcdClusterStoreTests(EtcdFixture fixture) : ClusterStoreContractTests, IClassFixture<EtcdFixture>
{
    protected override Task<IClusterStore> OpenAsync(string cluster) =>
        Task.FromResult<IClusterStore>(new EtcdClusterStore(fixture.Etcd.ClientUrl, cluster, Log));

    protected override Task<IClusterStore> OpenPeerAsync(IClusterStore first) =>
        Task.FromResult<IClusterStore>(new EtcdClusterStore(fixture.Etcd.ClientUrl, ((EtcdClusterStore)first).Cluster, Log));

    [Fact]
    public async Task Cluster_Etcd_TwoClustersOnOneEtcdDoNotSeeEachOther()
    {
        await using var red = new EtcdClusterStore(fixture.Etcd.ClientUrl, UniqueCluster("red"));
        await using var blue = new EtcdClusterStore(fixture.Etcd.ClientUrl, UniqueCluster("blue"));
        await using IClusterRegistration r = await red.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None);
        Assert.Single(await red.ListAsync(CancellationToken.None));
        Assert.Empty(await blue.ListAsync(CancellationToken.None));
        var raw = await red.Client.RangePrefixAsync(ClusterKeys.NodesPrefix(red.Cluster));
        Assert.Equal(ClusterKeys.NodeKey(red.Cluster, "node-a"), Assert.Single(raw.Kvs).Key.ToStringUtf8());
        Assert.Equal(((LeasedRegistration)r).LeaseId, raw.Kvs[0].Lease);
    }

    [Fact]
    public async Task Cluster_Etcd_RegisterWhenEtcdIsDown_FailsNamingTheEndpointAndHowToStartEtcd()
    {
        int port;
        using (var listener = new TcpListener(IPAddress.Loopback, 0))
        {
            listener.Start();
            port = ((IPEndPoint)listener.LocalEndpoint).Port;
        }

        await using var store = new EtcdClusterStore(new Uri($"http://127.0.0.1:{port}"), "down");
        var e = await Assert.ThrowsAsync<ClusterStoreUnavailableException>(() => store.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None));
        Assert.Contains($"http://127.0.0.1:{port}", e.Message, StringComparison.Ordinal);
        Assert.Contains("etcd-server", e.Message, StringComparison.Ordinal);
        Assert.Contains("--listen-client-urls", e.Message, StringComparison.Ordinal);

        await Assert.ThrowsAsync<ClusterStoreUnavailableException>(() => store.ListAsync(CancellationToken.None));
        // A watch that never reached etcd fails with the same clear error instead of retrying silently.
        await using var watch = new WatchProbe(store, "watch of a down etcd");
        var watchError = await Assert.ThrowsAsync<ClusterStoreUnavailableException>(() => watch.NextAsync(TimeSpan.FromSeconds(30), "the unreachable error"));
        Assert.Contains($"127.0.0.1:{port}", watchError.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Cluster_Etcd_WatchFromACompactedRevision_ListsAgainAndEmitsTheDifferences()
    {
        await using var store = new EtcdClusterStore(fixture.Etcd.ClientUrl, UniqueCluster("compact"));
        EtcdClient client = store.Client;
        string prefix = ClusterKeys.NodesPrefix(store.Cluster);
        int hooks = 0;
        store.BeforeWatchCreate = async (revision, ct) =>
        {
            if (Interlocked.Increment(ref hooks) != 1)
                return;
            // Between the listing and the watch: c comes and goes, d comes, and the history is compacted past the
            // revision the watch will start from, so etcd answers the watch with compact_revision.
            await client.PutAsync(prefix + "node-c", NodeInfoCodec.Encode(Node("node-c")), cancellationToken: ct);
            await client.PutAsync(prefix + "node-d", NodeInfoCodec.Encode(Node("node-d")), cancellationToken: ct);
            var deleted = await client.DeleteAsync(prefix + "node-c", ct);
            await client.CompactAsync(deleted.Header.Revision, ct);
        };

        await using var watch = new WatchProbe(store, store.Description);
        MembershipChange d = await watch.NextAsync(EventDeadline, "node-d Joined (from the second listing)");
        Assert.Equal((MembershipChangeKind.Joined, "node-d"), (d.Kind, d.Node.Node));

        await using IClusterRegistration r = await store.RegisterAsync(Node("node-e"), LongTtl, CancellationToken.None);
        MembershipChange e = await watch.NextAsync(EventDeadline, "node-e Joined (the watch goes on after the re-list)");
        Assert.Equal((MembershipChangeKind.Joined, "node-e"), (e.Kind, e.Node.Node));
        // Read only now: the second listing emits node-d before it runs the hook the second time.
        Assert.True(Volatile.Read(ref hooks) >= 2, "the watch should have listed again after etcd said its start revision was compacted");
        await client.DeletePrefixAsync(prefix);
    }

    [Fact]
    public async Task Cluster_Etcd_MalformedValuesAreIgnored()
    {
        await using var store = new EtcdClusterStore(fixture.Etcd.ClientUrl, UniqueCluster("junk"));
        string prefix = ClusterKeys.NodesPrefix(store.Cluster);
        await store.Client.PutAsync(prefix + "junk", "not json"u8);
        await using IClusterRegistration r = await store.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None);
        Assert.Equal("node-a", Assert.Single(await store.ListAsync(CancellationToken.None)).Node);
        await store.Client.DeletePrefixAsync(prefix);
    }
}

/// <summary>etcd killed and started again (same data dir and port) under a running store: its own etcd, not the shared one.</summary>
public sealed class EtcdRestartTests
{
    [Fact]
    public async Task Cluster_Etcd_Restarted_WatchResumesAndRegistrationsSurvive()
    {
        await using EtcdProcess etcd = await EtcdProcess.StartAsync();
        var log = new ListLogger();
        await using var store = new EtcdClusterStore(etcd.ClientUrl, "restart", log);
        await using var peer = new EtcdClusterStore(etcd.ClientUrl, "restart", log);
        await using IClusterRegistration ra = await store.RegisterAsync(Node("node-a"), TimeSpan.FromSeconds(3), CancellationToken.None);
        await using var watch = new WatchProbe(peer, "peer watch");
        Assert.Equal((MembershipChangeKind.Joined, "node-a"), Pair(await watch.NextAsync(TimeSpan.FromSeconds(15), "node-a Joined")));

        etcd.Kill();
        await Task.Delay(TimeSpan.FromMilliseconds(700)); // keepalives and the watch see the outage
        await etcd.RestartAsync();

        await using IClusterRegistration rb = await store.RegisterAsync(Node("node-b"), TimeSpan.FromSeconds(3), CancellationToken.None);
        await watch.UntilAsync(c => Pair(c) == (MembershipChangeKind.Joined, "node-b"), TimeSpan.FromSeconds(30),
            "node-b Joined after etcd restarted (the watch must have reconnected)");

        // node-a is still (or again, if its lease was lost meanwhile) a member, kept alive across the restart.
        await Task.Delay(TimeSpan.FromSeconds(4)); // longer than the TTL: only keepalives (or re-registration) keep both there
        // A lease that lapsed around the restart is re-registered by its keepalive loop: both are members again soon,
        // not necessarily at one given instant.
        string[] listed = [];
        await ClusterNodes.EventuallyAsync(async () =>
        {
            listed = [.. (await peer.ListAsync(CancellationToken.None)).Select(n => n.Node)];
            return listed.SequenceEqual(["node-a", "node-b"]);
        }, TimeSpan.FromSeconds(20), () => $"members after the restart: [{string.Join(", ", listed)}], not node-a and node-b");
        string logged = string.Join("\n", log.Lines);
        Assert.True(log.Contains("lost its connection") && log.Contains("reconnected"), "the watch's outage and reconnection must be logged; logged:\n" + logged);
    }

    private static (MembershipChangeKind, string) Pair(MembershipChange c) => (c.Kind, c.Node.Node);
}
