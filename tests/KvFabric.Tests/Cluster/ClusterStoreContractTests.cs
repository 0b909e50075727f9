using System.Diagnostics;
using KvFabric.Cluster;
using Xunit;
using static KvFabric.Tests.Cluster.ClusterNodes;

namespace KvFabric.Tests.Cluster;

/// <summary>The behaviour every IClusterStore must have; run against the in-process store and against a real etcd.</summary>
public abstract class ClusterStoreContractTests
{
    /// <summary>Short leases for the expiry tests (etcd's minimum lease is about 2 s).</summary>
    protected static readonly TimeSpan ShortTtl = TimeSpan.FromSeconds(2);
    /// <summary>A lease too long to expire within a test: what leaves during one was revoked.</summary>
    protected static readonly TimeSpan LongTtl = TimeSpan.FromSeconds(60);
    /// <summary>How long a change may take to reach a watcher (generous: a noisy 2-core VM).</summary>
    protected static readonly TimeSpan EventDeadline = TimeSpan.FromSeconds(15);

    /// <summary>What the stores of a test logged.</summary>
    protected ListLogger Log { get; } = new();

    /// <summary>A store for a fresh cluster (logging to <see cref="Log"/>).</summary>
    protected abstract Task<IClusterStore> OpenAsync(string cluster);

    /// <summary>A second store on the same backend and cluster as <paramref name="first"/> (another node's view).</summary>
    protected abstract Task<IClusterStore> OpenPeerAsync(IClusterStore first);

    [Fact]
    public async Task Cluster_RegisterListUpdateAndWatch()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("basic"));
        NodeInfo a = Node("node-a");
        await using IClusterRegistration ra = await store.RegisterAsync(a, LongTtl, CancellationToken.None);
        Assert.True(a.SameAs(ra.Current));

        IReadOnlyList<NodeInfo> listed = await store.ListAsync(CancellationToken.None);
        NodeInfo only = Assert.Single(listed);
        Assert.True(a.SameAs(only), $"listed {only} is not what was registered ({a}): the value must round-trip");
        Assert.Equal(a.AgentMetadata, only.AgentMetadata);

        await using var watch = new WatchProbe(store, store.Description);
        MembershipChange first = await watch.NextAsync(EventDeadline, "node-a Joined (the current members first)");
        Assert.Equal(MembershipChangeKind.Joined, first.Kind);
        Assert.True(a.SameAs(first.Node));

        NodeInfo b = Node("node-b", load: 0.5, incarnation: 7);
        await using IClusterRegistration rb = await store.RegisterAsync(b, LongTtl, CancellationToken.None);
        MembershipChange joined = await watch.NextAsync(EventDeadline, "node-b Joined");
        Assert.Equal((MembershipChangeKind.Joined, "node-b"), (joined.Kind, joined.Node.Node));
        Assert.Equal(7UL, joined.Node.Incarnation);

        NodeInfo a2 = a with { Load = 0.875, AgentMetadata = [9, 9] };
        long lease = ((LeasedRegistration)ra).LeaseId;
        await ra.UpdateAsync(a2, CancellationToken.None);
        MembershipChange updated = await watch.NextAsync(EventDeadline, "node-a Updated");
        Assert.Equal(MembershipChangeKind.Updated, updated.Kind);
        Assert.Equal(0.875, updated.Node.Load);
        Assert.Equal([9, 9], updated.Node.AgentMetadata);
        Assert.Equal(lease, ((LeasedRegistration)ra).LeaseId);
        Assert.True(a2.SameAs(ra.Current));

        await Assert.ThrowsAsync<ArgumentException>(() => ra.UpdateAsync(a2 with { Node = "renamed" }, CancellationToken.None));

        listed = await store.ListAsync(CancellationToken.None);
        Assert.Equal(["node-a", "node-b"], listed.Select(n => n.Node));
        Assert.Equal(0.875, listed[0].Load);
    }

    [Fact]
    public async Task Cluster_DisposeRevokesAtOnce()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("revoke"));
        IClusterRegistration r = await store.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None);
        await using var watch = new WatchProbe(store, store.Description);
        Assert.Equal(MembershipChangeKind.Joined, (await watch.NextAsync(EventDeadline, "node-a Joined")).Kind);

        await r.DisposeAsync();
        Assert.Empty(await store.ListAsync(CancellationToken.None)); // no waiting: the lease (60 s) was revoked
        MembershipChange left = await watch.NextAsync(EventDeadline, "node-a Left after dispose");
        Assert.Equal((MembershipChangeKind.Left, "node-a"), (left.Kind, left.Node.Node));
        Assert.Equal("worker-node-a", left.Node.Worker); // Left carries the last known info
        await r.DisposeAsync(); // twice is fine
    }

    [Fact]
    public async Task Cluster_LeaseExpiresWhenKeepalivesStop_ThenTheNodeReRegisters()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("expiry"));
        await using IClusterRegistration r = await store.RegisterAsync(Node("node-a"), ShortTtl, CancellationToken.None);
        var leased = (LeasedRegistration)r;
        long firstLease = leased.LeaseId;
        await using var watch = new WatchProbe(store, store.Description);
        Assert.Equal(MembershipChangeKind.Joined, (await watch.NextAsync(EventDeadline, "node-a Joined")).Kind);

        // Keepalives go on: after more than a TTL the node is still there.
        await Task.Delay(leased.Ttl + TimeSpan.FromSeconds(0.5));
        Assert.Single(await store.ListAsync(CancellationToken.None));
        Assert.Null(await watch.PeekAsync(TimeSpan.FromMilliseconds(10)));

        leased.Suspend(); // as if partitioned from the store
        var clock = Stopwatch.StartNew();
        MembershipChange left = await watch.NextAsync(EventDeadline, "node-a Left once its lease expired");
        TimeSpan took = clock.Elapsed;
        Assert.Equal((MembershipChangeKind.Left, "node-a"), (left.Kind, left.Node.Node));
        Assert.True(took <= leased.Ttl + TimeSpan.FromSeconds(1), $"node-a left {took} after its keepalives stopped; the TTL is {leased.Ttl} (+1 s slack)");
        Assert.Empty(await store.ListAsync(CancellationToken.None));

        leased.Resume(); // the store says the lease is gone: a new lease, the node is back
        MembershipChange back = await watch.NextAsync(EventDeadline, "node-a Joined again under a new lease");
        Assert.Equal((MembershipChangeKind.Joined, "node-a"), (back.Kind, back.Node.Node));
        // The count and the log line follow the put that watchers see: give them a moment.
        // At least one: on a starved machine a fresh 2 s lease can lapse again before its first keepalive runs.
        await ClusterNodes.EventuallyAsync(() => leased.Reregistrations >= 1 && Log.Contains($"lease {firstLease} of node node-a was lost"),
            EventDeadline, () => $"Reregistrations is {leased.Reregistrations}, not at least 1, or the loss was not logged; logged:\n{string.Join("\n", Log.Lines)}");
        Assert.NotEqual(firstLease, leased.LeaseId);
        Assert.Single(await store.ListAsync(CancellationToken.None));
    }

    [Fact]
    public async Task Cluster_UpdateAfterTheLeaseWasLost_ReRegistersWithTheNewInfo()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("update-lost"));
        await using IClusterRegistration r = await store.RegisterAsync(Node("node-a"), ShortTtl, CancellationToken.None);
        var leased = (LeasedRegistration)r;
        await using var watch = new WatchProbe(store, store.Description);
        Assert.Equal(MembershipChangeKind.Joined, (await watch.NextAsync(EventDeadline, "node-a Joined")).Kind);
        leased.Suspend();
        Assert.Equal(MembershipChangeKind.Left, (await watch.NextAsync(EventDeadline, "node-a Left once its lease expired")).Kind);

        await r.UpdateAsync(r.Current with { Load = 0.99 }, CancellationToken.None); // finds the lease gone
        MembershipChange back = await watch.NextAsync(EventDeadline, "node-a Joined again with the updated load");
        Assert.Equal((MembershipChangeKind.Joined, "node-a", 0.99), (back.Kind, back.Node.Node, back.Node.Load));
        Assert.Equal(1, leased.Reregistrations); // UpdateAsync counts before it returns
        Assert.Equal(0.99, Assert.Single(await store.ListAsync(CancellationToken.None)).Load);
    }

    [Fact]
    public async Task Cluster_TwoStoresSeeEachOther()
    {
        await using IClusterStore one = await OpenAsync(UniqueCluster("pair"));
        await using IClusterStore two = await OpenPeerAsync(one);
        await using var watchOne = new WatchProbe(one, "store one");
        await using var watchTwo = new WatchProbe(two, "store two");
        await using IClusterRegistration ra = await one.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None);
        await using IClusterRegistration rb = await two.RegisterAsync(Node("node-b"), LongTtl, CancellationToken.None);

        foreach (WatchProbe w in new[] { watchOne, watchTwo })
        {
            var seen = new List<string>();
            for (int i = 0; i < 2; i++)
            {
                MembershipChange c = await w.NextAsync(EventDeadline, "node-a and node-b Joined");
                Assert.Equal(MembershipChangeKind.Joined, c.Kind);
                seen.Add(c.Node.Node);
            }

            Assert.Equal(["node-a", "node-b"], seen.Order());
        }

        Assert.Equal(["node-a", "node-b"], (await one.ListAsync(CancellationToken.None)).Select(n => n.Node));
        Assert.Equal(["node-a", "node-b"], (await two.ListAsync(CancellationToken.None)).Select(n => n.Node));

        await rb.DisposeAsync();
        MembershipChange left = await watchOne.NextAsync(EventDeadline, "node-b Left (seen by the other store)");
        Assert.Equal((MembershipChangeKind.Left, "node-b"), (left.Kind, left.Node.Node));
    }

    [Fact]
    public async Task Cluster_DisposingAStoreRevokesItsRegistrations()
    {
        await using IClusterStore one = await OpenAsync(UniqueCluster("store-dispose"));
        IClusterStore two = await OpenPeerAsync(one);
        IClusterRegistration r = await two.RegisterAsync(Node("node-b"), LongTtl, CancellationToken.None);
        await using var watch = new WatchProbe(one, "store one");
        Assert.Equal(MembershipChangeKind.Joined, (await watch.NextAsync(EventDeadline, "node-b Joined")).Kind);

        await two.DisposeAsync();
        Assert.Empty(await one.ListAsync(CancellationToken.None));
        Assert.Equal(MembershipChangeKind.Left, (await watch.NextAsync(EventDeadline, "node-b Left when its store was disposed")).Kind);
        await r.DisposeAsync(); // after its store: harmless
    }

    [Fact]
    public async Task Cluster_WatchEndsWhenCancelled()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("cancel"));
        using var cts = new CancellationTokenSource();
        await using IClusterRegistration r = await store.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None);
        await using IAsyncEnumerator<MembershipChange> e = store.WatchAsync(cts.Token).GetAsyncEnumerator(cts.Token);
        Assert.True(await e.MoveNextAsync().AsTask().WaitAsync(EventDeadline));
        Task<bool> next = e.MoveNextAsync().AsTask();
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => next.WaitAsync(EventDeadline));
    }

    [Fact]
    public async Task Cluster_RejectsBadNamesAndValues()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("bad"));
        await Assert.ThrowsAsync<ArgumentException>(() => store.RegisterAsync(Node("a/b"), LongTtl, CancellationToken.None));
        await Assert.ThrowsAsync<ArgumentException>(() => store.RegisterAsync(Node("a") with { Load = double.NaN }, LongTtl, CancellationToken.None));
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(() => store.RegisterAsync(Node("a"), TimeSpan.FromMilliseconds(10), CancellationToken.None));
    }
}

public sealed class InProcessClusterStoreTests : ClusterStoreContractTests
{
    protected override Task<IClusterStore> OpenAsync(string cluster) => Task.FromResult<IClusterStore>(new InProcessClusterStore(cluster, log: Log));

    protected override Task<IClusterStore> OpenPeerAsync(IClusterStore first) =>
        Task.FromResult<IClusterStore>(((InProcessClusterStore)first).CreatePeer());

    // A watcher's queue is bounded: one that stops reading is ended with WatchOverflowException once a whole queue of
    // changes waits for it (nothing grows without bound), and watching again starts from a fresh listing.
    [Fact]
    public async Task A_watcher_that_stops_reading_is_ended_after_a_bounded_backlog_and_can_watch_again()
    {
        await using IClusterStore store = await OpenAsync(UniqueCluster("overflow"));
        await using IClusterRegistration r = await store.RegisterAsync(Node("node-a"), LongTtl, CancellationToken.None);
        await using var stalled = store.WatchAsync(CancellationToken.None).GetAsyncEnumerator();
        Assert.True(await stalled.MoveNextAsync()); // node-a joined; then the watcher stops reading
        int updates = WatchChannel.Capacity + 10;
        for (int i = 1; i <= updates; i++)
            await r.UpdateAsync(r.Current with { Load = i }, CancellationToken.None);
        var e = await Assert.ThrowsAsync<WatchOverflowException>(async () =>
        {
            while (await stalled.MoveNextAsync())
            {
            }
        });
        Assert.Contains("watch again", e.Message, StringComparison.Ordinal);
        await foreach (MembershipChange change in store.WatchAsync(CancellationToken.None))
        {
            Assert.Equal(MembershipChangeKind.Joined, change.Kind);
            Assert.Equal((double)updates, change.Node.Load);
            break;
        }
    }
}
