using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Service;
using KvFabric.Sidecar;
using KvFabric.Tiers;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>The sidecar over three tiers (an emulated GPU, host memory, an SSD log): what users see through the API.</summary>
public sealed class TieredSidecarTests : IDisposable
{
    private readonly string _dir = Directory.CreateTempSubdirectory("kvfabric-sidecar-ssd-").FullName;

    public void Dispose() => Directory.Delete(_dir, recursive: true);

    private SidecarOptions Options => new()
    {
        Node = "tiered", Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, StagingSlots = 2,
        GpuCapacityBytes = 4 * SidecarFixture.SmallLayout.BlockBytes,
        HostCapacityBytes = 8 * SidecarFixture.SmallLayout.BlockBytes,
        SsdDirectory = _dir,
        SsdCapacityBytes = 256 * SidecarFixture.SmallLayout.BlockBytes,
        Policy = "lru",
    };

    private static FabricClient Client(SidecarHost host) =>
        new(new RpcChannelOptions { Address = new Uri($"http://{host.GrpcEndpoint}"), Tenant = "dev", Token = "dev" });

    [Fact]
    public async Task The_ssd_tiers_health_is_exported_as_metrics()
    {
        await using var host = new SidecarHost(Options with { MetricsPort = 0 }, NullLoggerFactory.Instance);
        await host.StartAsync();
        using var http = new HttpClient();
        string text = await http.GetStringAsync($"http://{host.MetricsEndpoint}/metrics");
        Dictionary<string, string> types = KvFabric.Tests.Sidecar.SidecarMetricsTests.CheckExposition(text);
        Assert.Equal("gauge", types["kvfabric_ssd_writes_stopped"]);
        Assert.Equal("counter", types["kvfabric_ssd_no_space_writes"]);
        Assert.Equal("counter", types["kvfabric_ssd_tombstone_sectors"]);
        Assert.Equal("gauge", types["kvfabric_ssd_removals_not_durable"]);
        Assert.Equal("counter", types["kvfabric_ssd_compacted_segments"]);
        Assert.Equal("counter", types["kvfabric_ssd_compaction_dropped_unreadable"]);
        Assert.Contains("kvfabric_ssd_writes_stopped 0\n", text, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Blocks_demote_to_ssd_are_served_from_there_and_survive_a_restart()
    {
        int blockBytes = (int)SidecarFixture.SmallLayout.BlockBytes;
        var chains = Enumerable.Range(0, 6).Select(c => TestBlocks.Chain($"tiered-{c}", 4)).ToArray(); // 24 blocks > 4 + 8
        await using (var host = new SidecarHost(Options, NullLoggerFactory.Instance))
        {
            await host.StartAsync();
            using var client = Client(host);
            for (int c = 0; c < chains.Length; c++)
                Assert.Equal(4u, (await client.PutAsync(TestBlocks.ToPut(chains[c], blockBytes, 1000 * c))).Stored);

            StatsResponse stats = await client.StatsAsync();
            Assert.Equal([Tier.Gpu, Tier.Host, Tier.Ssd], stats.Tiers.Select(t => t.Tier));
            Assert.Contains("emulated", stats.Tiers[0].Implementation, StringComparison.OrdinalIgnoreCase);
            Assert.True(stats.Tiers[2].Blocks > 0, "nothing was demoted to the SSD tier");
            Assert.All(stats.Tiers, t => Assert.True(t.UsedBytes <= t.CapacityBytes));

            // The oldest chain went down; it is still whole, served byte-exact.
            LookupResponse first = await client.LookupAsync(TestBlocks.Packed(chains[0]));
            Assert.Equal(4u, first.MatchedBlocks);
            Assert.Contains(Tier.Ssd, first.Tiers);
            var dest = new byte[4 * blockBytes];
            await client.GetAsync(TestBlocks.Packed(chains[0]), dest, blockBytes);
            for (int i = 0; i < 4; i++)
                Assert.Equal(TestBlocks.Bytes(blockBytes, i), dest.AsSpan(i * blockBytes, blockBytes).ToArray());
        }

        // A new sidecar on the same SSD directory finds what was there (GPU and host memory start empty).
        await using (var host = new SidecarHost(Options, NullLoggerFactory.Instance))
        {
            await host.StartAsync();
            using var client = Client(host);
            int recovered = 0;
            for (int c = 0; c < chains.Length; c++)
            {
                LookupResponse r = await client.LookupAsync(TestBlocks.Packed(chains[c]));
                Assert.All(r.Tiers, t => Assert.Equal(Tier.Ssd, t));
                recovered += (int)r.MatchedBlocks;
                if (r.MatchedBlocks == 0)
                    continue;
                var dest = new byte[(int)r.MatchedBlocks * blockBytes];
                await client.GetAsync(TestBlocks.Packed(chains[c][..(int)r.MatchedBlocks]), dest, blockBytes);
                for (int i = 0; i < r.MatchedBlocks; i++)
                    Assert.Equal(TestBlocks.Bytes(blockBytes, 1000 * c + i), dest.AsSpan(i * blockBytes, blockBytes).ToArray());
            }

            Assert.True(recovered > 0, "no block came back from the SSD tier after the restart");
        }
    }

    [Fact]
    public async Task A_put_larger_than_every_tier_together_is_refused_before_anything_moves()
    {
        var o = Options with { GpuCapacityBytes = 0, SsdDirectory = null };
        await using var host = new SidecarHost(o, NullLoggerFactory.Instance);
        await host.StartAsync();
        using var client = Client(host);
        int blockBytes = (int)SidecarFixture.SmallLayout.BlockBytes;
        var kept = TestBlocks.Chain("kept", 2);
        await client.PutAsync(TestBlocks.ToPut(kept, blockBytes, 1));
        var e = await Assert.ThrowsAsync<RpcException>(() => client.PutAsync(TestBlocks.ToPut(TestBlocks.Chain("huge", 9), blockBytes, 2)));
        Assert.Equal(StatusCode.ResourceExhausted, e.Status);
        Assert.Equal(2u, (await client.LookupAsync(TestBlocks.Packed(kept))).MatchedBlocks);
    }

    // Blocks outside host memory are read into a bounded pool of buffers, one per block as its turn comes: a read waits
    // for a free buffer (here: one) instead of allocating, and a Get of many SSD blocks streams through it.
    [Fact]
    public async Task Reads_of_blocks_outside_host_memory_share_a_bounded_pool_of_buffers()
    {
        int blockBytes = (int)SidecarFixture.SmallLayout.BlockBytes;
        var chains = Enumerable.Range(0, 6).Select(c => TestBlocks.Chain($"bounded-{c}", 4).Select(h => BlockHash.FromBytes(h)).ToArray()).ToArray();
        var options = Options with { GpuCapacityBytes = 0, ReadBuffers = 1 };
        using var tiers = await SidecarTiers.OpenAsync(options, NullLogger.Instance, CancellationToken.None);
        var store = tiers.Store;
        Assert.Equal(1, store.ReadBufferCount);
        foreach (var (chain, c) in chains.Select((chain, c) => (chain, c)))
        {
            using var put = store.BeginPut(0);
            for (int i = 0; i < chain.Length; i++)
                TestBlocks.Bytes(blockBytes, 1000 * c + i).CopyTo(put.Add(chain[i], i == 0 ? null : chain[i - 1], i));
            Assert.Equal(4, (await put.CommitAsync(CancellationToken.None)).Stored);
        }
        var onSsd = chains.SelectMany((chain, c) => chain.Select((h, i) => (Hash: h, Value: 1000 * c + i)))
            .Where(b => { Span<TierKind> t = stackalloc TierKind[1]; return store.Lookup(0, [b.Hash], t) == 1 && t[0] == TierKind.Ssd; })
            .Take(2).ToArray();
        Assert.Equal(2, onSsd.Length);

        using ReadLease first = (await store.OpenReadAsync(0, onSsd[0].Hash, CancellationToken.None))!;
        using ReadLease second = (await store.OpenReadAsync(0, onSsd[1].Hash, CancellationToken.None))!;
        Assert.Equal(TierKind.Ssd, first.Tier);
        Assert.Equal(TestBlocks.Bytes(blockBytes, onSsd[0].Value), (await first.LoadAsync(CancellationToken.None)).ToArray());
        using (var soon = new CancellationTokenSource(TimeSpan.FromMilliseconds(200)))
            await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await second.LoadAsync(soon.Token)); // the one buffer is taken
        first.Dispose();
        Assert.Equal(TestBlocks.Bytes(blockBytes, onSsd[1].Value), (await second.LoadAsync(CancellationToken.None)).ToArray());
    }
}
