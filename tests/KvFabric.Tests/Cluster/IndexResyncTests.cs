using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Cluster;
using KvFabric.Index;
using KvFabric.Rpc;
using KvFabric.Sidecar;
using KvFabric.Tests.Rpc;
using KvFabric.Tiers;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Cluster;

/// <summary>
/// A replica fed from a real sidecar's SubscribeEvents stream: a gap makes it resubscribe and get the missing range; when
/// it fell further behind than the node keeps, it gets a snapshot, and afterwards its index equals the node's store.
/// </summary>
public sealed class IndexResyncTests : IAsyncLifetime
{
    private const int CapacityBlocks = 16, LogCapacity = 8;
    private static readonly uint Tenant = TenantRegistry.IdOf("dev");
    private SidecarHost _host = null!;

    public async Task InitializeAsync()
    {
        _host = new SidecarHost(new SidecarOptions
        {
            Node = "node-r", Worker = "w-r", Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout,
            HostCapacityBytes = CapacityBlocks * SidecarFixture.SmallLayout.BlockBytes, EventLogCapacity = LogCapacity, Policy = "lru",
        }, NullLoggerFactory.Instance);
        await _host.StartAsync();
    }

    public async Task DisposeAsync() => await _host.DisposeAsync();

    private FabricClient Client() => FabricClient.Connect($"http://{_host.GrpcEndpoint}", "dev", "dev");

    /// <summary>Reads the stream into the sequencer until it holds everything the node logged; returns the first non-applied verdict, if any.</summary>
    private async Task<FeedVerdict?> CatchUpAsync(FabricClient client, EventSequencer sequencer)
    {
        using var cts = new CancellationTokenSource(TimeSpan.FromSeconds(20));
        await using var call = client.SubscribeEvents(sequencer.LastSequence + 1, new CallOptions(CancellationToken: cts.Token), sequencer.Incarnation, "dev");
        while (sequencer.Incarnation != _host.Store.Events.Incarnation || sequencer.LastSequence < _host.Store.Events.LastSequence(Tenant))
        {
            var e = await call.ReadAsync() ?? throw new InvalidOperationException("the event stream ended");
            FeedVerdict v = await sequencer.AcceptAsync(e, cts.Token);
            if (v is FeedVerdict.Gap or FeedVerdict.Malformed or FeedVerdict.Stale)
                return v;
        }

        return null;
    }

    private static BlockHash[] Chain(string name, int n) => TestBlocks.Chain(name, n).Select(h => BlockHash.FromBytes(h)).ToArray();

    private async Task PutAsync(FabricClient client, string name, int n) =>
        await client.PutAsync(TestBlocks.ToPut(TestBlocks.Chain(name, n), (int)SidecarFixture.SmallLayout.BlockBytes, 1));

    /// <summary>The index's answer for the chain, against what the node's store holds of it.</summary>
    private void AssertIndexEqualsStore(RadixClusterIndex index, BlockHash[] chain)
    {
        var tiers = new TierKind[chain.Length];
        int held = _host.Store.Lookup(Tenant, chain, tiers);
        var matches = new List<LocationMatch>();
        index.Match(Tenant, chain, matches);
        int indexed = matches.SingleOrDefault(m => m.Node == "node-r" && m.Worker == "w-r").Host;
        Assert.Equal(held, indexed);
    }

    [Fact]
    public async Task A_gap_brings_the_missing_range_and_falling_behind_the_log_brings_a_snapshot()
    {
        using var client = Client();
        using var index = new RadixClusterIndex(new RadixIndex());
        var counters = new FeedCounters();
        var sequencer = new EventSequencer("node-r", Tenant, index, counters);

        await PutAsync(client, "resync-a", 4);
        Assert.Null(await CatchUpAsync(client, sequencer));
        await index.FlushAsync(default);
        AssertIndexEqualsStore(index, Chain("resync-a", 4));
        Assert.Equal(4, index.Index.Counters.Blocks);

        // A delivery that skips ahead is a gap: nothing of it is applied; resubscribing from where the replica is
        // brings the missing events (the node still keeps them).
        await PutAsync(client, "resync-b", 2);
        var ahead = new KvFabric.Rpc.V1.KvEvent
        {
            Sequence = sequencer.LastSequence + 2, Node = "node-r", Worker = "w-r", Incarnation = sequencer.Incarnation,
            Removed = new KvFabric.Rpc.V1.BlocksRemoved { Hashes = Hashes.Pack(Chain("resync-a", 4)), Tier = KvFabric.Rpc.V1.Tier.Host },
        };
        Assert.Equal(FeedVerdict.Gap, await sequencer.AcceptAsync(ahead, default));
        Assert.Null(await CatchUpAsync(client, sequencer));
        await index.FlushAsync(default);
        AssertIndexEqualsStore(index, Chain("resync-a", 4));
        AssertIndexEqualsStore(index, Chain("resync-b", 2));
        Assert.Equal(0, counters.Snapshots);

        // Far more events than the node keeps (8), with evictions among them, while the replica is away: a snapshot.
        for (int i = 0; i < 6; i++)
            await PutAsync(client, "resync-c" + i, 4);
        Assert.True(_host.Store.Events.LastSequence(Tenant) - sequencer.LastSequence > LogCapacity);
        Assert.Null(await CatchUpAsync(client, sequencer));
        await index.FlushAsync(default);
        Assert.Equal(1, counters.Snapshots);
        foreach (string name in new[] { "resync-a", "resync-b" }.Concat(Enumerable.Range(0, 6).Select(i => "resync-c" + i)))
            AssertIndexEqualsStore(index, Chain(name, name == "resync-b" ? 2 : 4));
        Assert.Equal(CapacityBlocks, index.Index.Counters.Blocks); // the full tier, nothing more: evicted blocks left the index
        Assert.Equal(0, index.Index.Counters.RejectedTotal);

        // And live events go on after the snapshot.
        await _host.Store.DeleteAsync(Tenant, Chain("resync-c5", 4), default);
        Assert.Null(await CatchUpAsync(client, sequencer));
        await index.FlushAsync(default);
        AssertIndexEqualsStore(index, Chain("resync-c5", 4));
    }
}
