using KvFabric.Blocks;
using KvFabric.Cluster;
using KvFabric.Sidecar;
using KvFabric.Tests.Rpc;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Cluster;

/// <summary>
/// The periodic reconciliation of ClusterNode against a listing of the store must not undo what the watch applied
/// meanwhile: a listing taken before a member left must not bring the dead member back as a routing candidate.
/// </summary>
public sealed class ClusterNodeMembershipRaceTests
{
    /// <summary>A store whose next ListAsync can be held after it listed (the listing is then older than the watch).</summary>
    private sealed class GatedStore(IClusterStore inner) : IClusterStore
    {
        private readonly object _lock = new();
        private TaskCompletionSource? _listed, _release, _called;

        public string Description => inner.Description;

        /// <summary>The next listing is taken, reported through the returned task, and held until <see cref="Release"/>.</summary>
        public Task ArmHold()
        {
            lock (_lock)
            {
                _listed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                _release = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                return _listed.Task;
            }
        }

        public void Release()
        {
            lock (_lock)
                _release!.TrySetResult();
        }

        /// <summary>Completes at the next call of ListAsync (the previous reconciliation has ended by then).</summary>
        public Task NextCall()
        {
            lock (_lock)
            {
                _called = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                return _called.Task;
            }
        }

        public Task<IClusterRegistration> RegisterAsync(NodeInfo self, TimeSpan ttl, CancellationToken cancellationToken) =>
            inner.RegisterAsync(self, ttl, cancellationToken);

        public async Task<IReadOnlyList<NodeInfo>> ListAsync(CancellationToken cancellationToken)
        {
            TaskCompletionSource? called, listed, release;
            lock (_lock)
            {
                called = _called;
                _called = null;
                listed = _listed;
                release = _release;
                _listed = null;
            }

            called?.TrySetResult();
            IReadOnlyList<NodeInfo> result = await inner.ListAsync(cancellationToken);
            if (listed is not null)
            {
                listed.TrySetResult();
                await release!.Task.WaitAsync(TimeSpan.FromSeconds(30), cancellationToken);
            }

            return result;
        }

        public IAsyncEnumerable<MembershipChange> WatchAsync(CancellationToken cancellationToken) => inner.WatchAsync(cancellationToken);

        public ValueTask DisposeAsync() => inner.DisposeAsync();
    }

    [Fact]
    public async Task A_listing_older_than_a_departure_does_not_bring_the_dead_member_back()
    {
        await using var members = new InProcessClusterStore(ClusterNodes.UniqueCluster("reconcile"));
        var gated = new GatedStore(members.CreatePeer());
        IClusterRegistration ghost = await members.RegisterAsync(
            ClusterNodes.Node("ghost") with { GrpcEndpoint = "http://127.0.0.1:9" }, TimeSpan.FromSeconds(30), default);
        await using var host = new SidecarHost(new SidecarOptions
        {
            Node = "node-live", Worker = "w-live", Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout,
            HostCapacityBytes = 16 * SidecarFixture.SmallLayout.BlockBytes, Cluster = "inproc", ClusterLeaseTtl = TimeSpan.FromSeconds(1),
        }, NullLoggerFactory.Instance, gated);
        await host.StartAsync();
        ClusterNode node = host.Cluster!;
        bool Knows(string name) => node.Members.Any(m => m.Node == name);
        await ClusterNodes.EventuallyAsync(() => Knows("ghost"), TimeSpan.FromSeconds(20), () => "the live node never saw the ghost join");

        // A reconciliation lists the members (the ghost among them) and is held there.
        await gated.ArmHold().WaitAsync(TimeSpan.FromSeconds(20));
        // Meanwhile the ghost leaves. The watch reports it at once; it may apply it now (then the held listing is older
        // than what the node knows) or only after the reconciliation (which then must not be overtaken): wait for the
        // first, bounded, since a node that orders the two waits here for nothing.
        await ghost.DisposeAsync();
        using (var settle = new CancellationTokenSource(TimeSpan.FromSeconds(3)))
        {
            while (Knows("ghost") && !settle.IsCancellationRequested)
                await Task.Delay(20);
        }

        // The held reconciliation goes on with its older listing; once it is over and the watch's departure applied,
        // the ghost must be gone: not a member, not a routing candidate.
        Task next = gated.NextCall();
        gated.Release();
        await ClusterNodes.EventuallyAsync(() => !Knows("ghost"), TimeSpan.FromSeconds(20), () => "the watch never took the ghost out");
        await next.WaitAsync(TimeSpan.FromSeconds(20));
        Assert.False(Knows("ghost"), "a listing older than the ghost's departure made it a member again");
        Assert.DoesNotContain(node.Candidates(1, [BlockHash.FromBytes(new byte[16] { 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1 })]),
            c => c.Node == "ghost");
    }
    [Fact]
    public async Task A_member_publishing_an_unusable_endpoint_does_not_stop_the_membership_of_the_others()
    {
        await using var members = new InProcessClusterStore(ClusterNodes.UniqueCluster("bad-endpoint"));
        // "host:port" (docs/cluster.md's form) and a value no gRPC channel takes: neither may wedge the watch.
        IClusterRegistration plain = await members.RegisterAsync(
            ClusterNodes.Node("zz-plain") with { GrpcEndpoint = "127.0.0.1:9" }, TimeSpan.FromSeconds(30), default);
        IClusterRegistration bad = await members.RegisterAsync(
            ClusterNodes.Node("zz-bad") with { GrpcEndpoint = "not a url" }, TimeSpan.FromSeconds(30), default);
        await using var host = new SidecarHost(new SidecarOptions
        {
            Node = "node-live", Worker = "w-live", Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout,
            HostCapacityBytes = 16 * SidecarFixture.SmallLayout.BlockBytes, Cluster = "inproc", ClusterLeaseTtl = TimeSpan.FromSeconds(1),
        }, NullLoggerFactory.Instance, members.CreatePeer());
        await host.StartAsync();
        ClusterNode node = host.Cluster!;
        bool Knows(string name) => node.Members.Any(m => m.Node == name);

        // A member that joins later, after the unusable one in the watch's order, is still seen, and so is its departure.
        IClusterRegistration later = await members.RegisterAsync(
            ClusterNodes.Node("zzz-later") with { GrpcEndpoint = "http://127.0.0.1:9" }, TimeSpan.FromSeconds(30), default);
        await ClusterNodes.EventuallyAsync(() => Knows("zzz-later"), TimeSpan.FromSeconds(20),
            () => $"a member joining after one with an unusable endpoint was never seen; members: {string.Join(", ", node.Members.Select(m => m.Node))}");
        Assert.True(Knows("zz-plain"), "a member publishing host:port was not taken");
        Assert.False(Knows("zz-bad"));
        await later.DisposeAsync();
        await plain.DisposeAsync();
        await ClusterNodes.EventuallyAsync(() => !Knows("zzz-later") && !Knows("zz-plain"), TimeSpan.FromSeconds(20),
            () => "departures after one with an unusable endpoint were never applied");
        await bad.DisposeAsync();
    }
}
