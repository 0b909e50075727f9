using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Cluster;
using KvFabric.Index;
using KvFabric.Rpc;
using KvFabric.Rpc.V1;
using KvFabric.Service;
using KvFabric.Sidecar;
using KvFabric.Tests.Rpc;
using KvFabric.Tiers;
using KvFabric.Transfer;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Cluster;

/// <summary>A cross-node Fetch whose source leaves the cluster after its blocks were read.</summary>
public sealed class FetchSourceLeavesTests
{
    /// <summary>Passes everything through, keeping the registrations it made, so a test can take a node out of the store alone.</summary>
    private sealed class CapturingStore(IClusterStore inner) : IClusterStore
    {
        public readonly List<IClusterRegistration> Registrations = [];

        public string Description => inner.Description;

        public async Task<IClusterRegistration> RegisterAsync(NodeInfo self, TimeSpan ttl, CancellationToken cancellationToken)
        {
            IClusterRegistration r = await inner.RegisterAsync(self, ttl, cancellationToken);
            lock (Registrations)
                Registrations.Add(r);
            return r;
        }

        public Task<IReadOnlyList<NodeInfo>> ListAsync(CancellationToken cancellationToken) => inner.ListAsync(cancellationToken);

        public IAsyncEnumerable<MembershipChange> WatchAsync(CancellationToken cancellationToken) => inner.WatchAsync(cancellationToken);

        public ValueTask DisposeAsync() => inner.DisposeAsync();
    }

    /// <summary>A store whose Put commits wait for the test (the fetched blocks have been read by then).</summary>
    private sealed class GatedFabricStore(IFabricStore inner) : IFabricStore
    {
        public readonly TaskCompletionSource Committing = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public readonly TaskCompletionSource Proceed = new(TaskCreationOptions.RunContinuationsAsynchronously);

        public KvLayout Layout => inner.Layout;
        public int BlockBytes => inner.BlockBytes;
        public string Node => inner.Node;
        public KvEventLogs Events => inner.Events;

        public int Lookup(uint tenant, ReadOnlySpan<BlockHash> chain, Span<TierKind> tiers) => inner.Lookup(tenant, chain, tiers);

        public IPutBatch BeginPut(uint tenant) => new Batch(this, inner.BeginPut(tenant));

        public ValueTask<ReadLease?> OpenReadAsync(uint tenant, BlockHash hash, CancellationToken cancellationToken) =>
            inner.OpenReadAsync(tenant, hash, cancellationToken);

        public PinLease Pin(uint tenant, ReadOnlySpan<BlockHash> hashes, TimeSpan lease) => inner.Pin(tenant, hashes, lease);

        public bool Unpin(uint tenant, ulong leaseId) => inner.Unpin(tenant, leaseId);

        public ValueTask<int> DeleteAsync(uint tenant, BlockHash[] hashes, CancellationToken cancellationToken) =>
            inner.DeleteAsync(tenant, hashes, cancellationToken);

        public StoreStats GetStats(uint tenant) => inner.GetStats(tenant);

        public (ulong Sequence, IReadOnlyList<KvFabric.Service.KvEvent> Events) Snapshot(uint tenant) => inner.Snapshot(tenant);

        public void Dispose()
        {
            // the host that made the inner store disposes it
        }

        private sealed class Batch(GatedFabricStore store, IPutBatch inner) : IPutBatch
        {
            public Memory<byte> Add(BlockHash hash, BlockHash? parent, int depth) => inner.Add(hash, parent, depth);

            public async ValueTask<PutOutcome> CommitAsync(CancellationToken cancellationToken)
            {
                store.Committing.TrySetResult();
                await store.Proceed.Task.WaitAsync(TimeSpan.FromSeconds(30), cancellationToken);
                return await inner.CommitAsync(cancellationToken);
            }

            public void Dispose() => inner.Dispose();
        }
    }

    [Fact]
    public async Task A_fetch_whose_source_left_after_the_read_returns_what_it_stored_not_a_disposed_client()
    {
        var layout = SidecarFixture.SmallLayout;
        int blockBytes = (int)layout.BlockBytes;
        await using var members = new InProcessClusterStore(ClusterNodes.UniqueCluster("fetch-left"));
        var capture = new CapturingStore(members.CreatePeer());
        await using var source = new SidecarHost(new SidecarOptions
        {
            Node = "node-b", Worker = "w-b", Port = 0, MetricsPort = -1, Dev = true, Layout = layout,
            HostCapacityBytes = 16 * layout.BlockBytes, Cluster = "inproc", ClusterLeaseTtl = TimeSpan.FromSeconds(30),
        }, NullLoggerFactory.Instance, capture);
        await source.StartAsync();
        byte[][] chain = TestBlocks.Chain("fetch-left", 2);
        using (FabricClient client = FabricClient.Connect($"http://{source.GrpcEndpoint}", "dev", "dev"))
            await client.PutAsync(TestBlocks.ToPut(chain, blockBytes, 7));

        // The fetching node, built by hand so that its store can hold the fetch between the read and the release.
        await using var local = new SidecarHost(new SidecarOptions
        {
            Node = "node-a-store", Port = 0, MetricsPort = -1, Dev = true, Layout = layout, HostCapacityBytes = 16 * layout.BlockBytes,
        }, NullLoggerFactory.Instance);
        await local.StartAsync();
        var gated = new GatedFabricStore(local.Store);
        using var staging = new StagingArea(blockBytes, 8);
        await using var agent = new TransferAgent(new TransferAgentOptions { Name = "node-a" });
        agent.Register(staging.Pool);
        var log = new ListLogger();
        var node = new ClusterNode(members.CreatePeer(), new RadixClusterIndex(new RadixIndex()), new ClusterNodeOptions
        {
            Node = "node-a", Worker = "w-a", ClusterTenant = "dev", ClusterToken = "dev", Tenants = ["dev"], LeaseTtl = TimeSpan.FromSeconds(30),
        }, agent, gated, staging, () => 0, log);
        try
        {
            await node.StartAsync("http://127.0.0.1:9", default);
            uint tenant = TenantRegistry.IdOf("dev");
            BlockHash[] hashes = chain.Select(h => BlockHash.FromBytes(h)).ToArray();
            await ClusterNodes.EventuallyAsync(() =>
            {
                var m = new List<LocationMatch>();
                node.Index.Match(tenant, hashes, m);
                return m.Any(x => x.Node == "node-b" && x.Matched == 2);
            }, TimeSpan.FromSeconds(20), () => "node-a's index never learnt what node-b holds");

            Task<FetchResponse> fetch = node.FetchAsync(tenant, "dev", hashes, TimeSpan.FromSeconds(60), default);
            await gated.Committing.Task.WaitAsync(TimeSpan.FromSeconds(20)); // read through the transfer layer, storing now
            IClusterRegistration registration;
            lock (capture.Registrations)
                registration = capture.Registrations.Single();
            await registration.DisposeAsync(); // node-b leaves the cluster; its server stays up
            await ClusterNodes.EventuallyAsync(() => log.Contains("node node-b left the cluster"), TimeSpan.FromSeconds(20),
                () => "node-a never applied node-b's departure");
            gated.Proceed.TrySetResult();

            FetchResponse response = await fetch.WaitAsync(TimeSpan.FromSeconds(20));
            Assert.Equal(2u, response.FetchedBlocks);
            Assert.Equal(2, local.Store.Lookup(tenant, hashes, new TierKind[2]));
            // And the source's staging slots came back at once, not when the export's 30 s lease ended.
            await ClusterNodes.EventuallyAsync(() => source.Staging.Available == source.Staging.Capacity, TimeSpan.FromSeconds(20),
                () => $"node-b still holds {source.Staging.Capacity - source.Staging.Available} staging slots for the fetch's export");
        }
        finally
        {
            await node.DisposeAsync();
        }
    }
}
