using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>Export (what a peer's Fetch reads through the transfer layer) and Fetch on a standalone node.</summary>
public sealed class ExportFetchTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [Fact]
    public async Task Export_copies_the_present_prefix_into_registered_memory_and_release_frees_it()
    {
        using var alpha = fx.Client();
        using var admin = fx.Client("dev", "dev");
        var chain = TestBlocks.Chain("export-prefix", 3);
        await alpha.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 40));
        int free = fx.Host.Staging.Available;
        // The chain asked for is longer than what is cached: the export stops at the cached prefix.
        ExportResponse export = await admin.ExportAsync("alpha", TestBlocks.Packed(chain.Concat(TestBlocks.Chain("export-missing", 2)).ToArray()));
        Assert.Equal(3, export.Blocks.Count);
        Assert.Equal(fx.Host.Agent.AgentId.ToString(), export.AgentId);
        Assert.Equal(free - 3, fx.Host.Staging.Available);
        for (int i = 0; i < 3; i++)
        {
            ExportedBlock b = export.Blocks[i];
            Assert.Equal((ulong)fx.BlockBytes, b.Length);
            Assert.Equal(Tier.Host, b.Tier);
            // Inside a region the agent exports to peers, and holding the block's bytes.
            Assert.Contains(fx.Host.Agent.Regions, r => b.Address >= r.Address && b.Address + b.Length <= r.Address + r.Length);
            unsafe
            {
                var bytes = new ReadOnlySpan<byte>((void*)(nint)b.Address, fx.BlockBytes);
                Assert.True(bytes.SequenceEqual(TestBlocks.Bytes(fx.BlockBytes, 40 + i)));
            }
        }

        Assert.True((await admin.ReleaseExportAsync("alpha", export.ExportId)).Released);
        Assert.False((await admin.ReleaseExportAsync("alpha", export.ExportId)).Released);
        Assert.Equal(free, fx.Host.Staging.Available);
    }

    [Fact]
    public async Task Export_is_for_admin_tenants_and_configured_tenants_only_and_exports_nothing_absent()
    {
        using var alpha = fx.Client();
        using var admin = fx.Client("dev", "dev");
        var chain = TestBlocks.Chain("export-denied", 1);
        var denied = await Assert.ThrowsAsync<RpcException>(() => alpha.ExportAsync("alpha", TestBlocks.Packed(chain)));
        Assert.Equal(StatusCode.PermissionDenied, denied.Status);
        var unknown = await Assert.ThrowsAsync<RpcException>(() => admin.ExportAsync("nobody", TestBlocks.Packed(chain)));
        Assert.Equal(StatusCode.NotFound, unknown.Status);
        Assert.Contains("nobody", unknown.Detail, StringComparison.Ordinal);
        ExportResponse none = await admin.ExportAsync("alpha", TestBlocks.Packed(chain));
        Assert.Empty(none.Blocks);
        Assert.Equal(0ul, none.ExportId);
        // Another tenant's blocks are not alpha's: the same hashes export nothing for beta.
        using var beta = fx.Client("beta");
        await alpha.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 3));
        Assert.Empty((await admin.ExportAsync("beta", TestBlocks.Packed(chain))).Blocks);
    }

    [Fact]
    public async Task A_standalone_node_fetches_nothing_and_says_what_is_local()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("fetch-standalone", 3);
        await client.PutAsync(TestBlocks.ToPut(chain.Take(2).ToArray(), fx.BlockBytes, 9));
        FetchResponse r = await client.FetchAsync(TestBlocks.Packed(chain));
        Assert.Equal((2u, 0u, string.Empty), (r.LocalBlocks, r.FetchedBlocks, r.SourceNode));
    }

    [Fact]
    public async Task Subscribing_for_another_tenant_needs_an_admin_tenant()
    {
        using var alpha = fx.Client();
        await using var call = alpha.SubscribeEvents(1, new CallOptions(Deadline: TimeSpan.FromSeconds(10)), tenant: "beta");
        var e = await Assert.ThrowsAsync<RpcException>(async () => await call.ReadAsync());
        Assert.Equal(StatusCode.PermissionDenied, e.Status);
    }
}
