using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

public sealed class FabricServiceTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [Fact]
    public async Task Put_then_Lookup_and_Get_round_trip_bytes_exactly()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("roundtrip", 4);
        PutResponse put = await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 100));
        Assert.Equal(4u, put.Stored);
        Assert.Equal((ulong)(4 * fx.BlockBytes), put.BytesReceived);

        var longer = chain.Concat(TestBlocks.Chain("roundtrip-miss", 2)).ToArray();
        LookupResponse lookup = await client.LookupAsync(TestBlocks.Packed(longer));
        Assert.Equal(4u, lookup.MatchedBlocks);
        Assert.All(lookup.Tiers, t => Assert.Equal(Tier.Host, t));

        var dest = new byte[4 * fx.BlockBytes];
        Tier[] tiers = await client.GetAsync(TestBlocks.Packed(chain), dest, fx.BlockBytes, chunkBytes: 4096);
        Assert.Equal(4, tiers.Length);
        for (int i = 0; i < 4; i++)
            Assert.Equal(TestBlocks.Bytes(fx.BlockBytes, 100 + i), dest.AsSpan(i * fx.BlockBytes, fx.BlockBytes).ToArray());
    }

    [Fact]
    public async Task Tenants_are_isolated_and_tokens_checked()
    {
        using var alpha = fx.Client("alpha");
        using var beta = fx.Client("beta");
        var chain = TestBlocks.Chain("isolation", 2);
        await alpha.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 7));
        Assert.Equal(0u, (await beta.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
        var notFound = await Assert.ThrowsAsync<RpcException>(() => beta.GetAsync(TestBlocks.Packed(chain), new byte[2 * fx.BlockBytes], fx.BlockBytes));
        Assert.Equal(StatusCode.NotFound, notFound.Status);

        using var badToken = fx.Client("alpha", token: "wrong");
        Assert.Equal(StatusCode.Unauthenticated, (await Assert.ThrowsAsync<RpcException>(() => badToken.LookupAsync(TestBlocks.Packed(chain)))).Status);
        using var crossTenant = fx.Client("beta", token: "alpha-token");
        Assert.Equal(StatusCode.PermissionDenied, (await Assert.ThrowsAsync<RpcException>(() => crossTenant.LookupAsync(TestBlocks.Packed(chain)))).Status);
        using var unknownTenant = fx.Client("gamma", token: "alpha-token");
        var unknown = await Assert.ThrowsAsync<RpcException>(() => unknownTenant.StatsAsync());
        Assert.Equal(StatusCode.PermissionDenied, unknown.Status);
        Assert.Contains("not configured", unknown.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Bad_input_gets_a_precise_status_and_stores_nothing()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("bad-input", 2);

        var wrongHash = await Assert.ThrowsAsync<RpcException>(() => client.LookupAsync(new byte[17]));
        Assert.Equal(StatusCode.InvalidArgument, wrongHash.Status);
        Assert.Contains("multiple of 16", wrongHash.Detail, StringComparison.Ordinal);

        // One good block, then one of the wrong size: the whole Put fails and neither is stored.
        var blocks = new[]
        {
            new BlockToPut(chain[0], ReadOnlyMemory<byte>.Empty, 0, TestBlocks.Bytes(fx.BlockBytes, 1)),
            new BlockToPut(chain[1], chain[0], 1, TestBlocks.Bytes(fx.BlockBytes - 1, 2)),
        };
        var wrongSize = await Assert.ThrowsAsync<RpcException>(() => client.PutAsync(blocks));
        Assert.Equal(StatusCode.InvalidArgument, wrongSize.Status);
        Assert.Contains($"exactly {fx.BlockBytes} bytes", wrongSize.Detail, StringComparison.Ordinal);
        Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);

        var missing = await Assert.ThrowsAsync<RpcException>(() => client.GetAsync(TestBlocks.Packed(chain), new byte[2 * fx.BlockBytes], fx.BlockBytes));
        Assert.Equal(StatusCode.NotFound, missing.Status);
        Assert.Equal(StatusCode.NotFound, (await Assert.ThrowsAsync<RpcException>(() => client.PinAsync(TestBlocks.Packed(chain)))).Status);
    }

    [Fact]
    public async Task Put_over_capacity_is_resource_exhausted_and_changes_nothing()
    {
        using var client = fx.Client("beta");
        var before = await client.StatsAsync();
        var chain = TestBlocks.Chain("capacity", SidecarFixture.Capacity + 1);
        var full = await Assert.ThrowsAsync<RpcException>(() => client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 5)));
        Assert.Equal(StatusCode.ResourceExhausted, full.Status);
        var after = await client.StatsAsync();
        Assert.Equal(before.TenantBlocks, after.TenantBlocks);
        Assert.Equal(before.Tiers[0].UsedBytes, after.Tiers[0].UsedBytes);
    }

    [Fact]
    public async Task Concurrent_puts_of_the_same_block_are_idempotent()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("concurrent", 1);
        var puts = Enumerable.Range(0, 8).Select(_ => client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 42))).ToArray();
        PutResponse[] results = await Task.WhenAll(puts);
        Assert.Equal(1u, (uint)results.Sum(r => r.Stored));
        Assert.Equal(7u, (uint)results.Sum(r => r.AlreadyPresent));
        var dest = new byte[fx.BlockBytes];
        await client.GetAsync(TestBlocks.Packed(chain), dest, fx.BlockBytes);
        Assert.Equal(TestBlocks.Bytes(fx.BlockBytes, 42), dest);
    }

    [Fact]
    public async Task Reserved_slots_carry_blocks_both_ways_through_shared_memory()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("slots", 2);
        ReserveResponse r = await client.ReserveAsync(2);
        Assert.Equal(2, r.Slots.Count);
        for (int i = 0; i < 2; i++)
            WriteSlot(r.Slots[i], TestBlocks.Bytes(fx.BlockBytes, 300 + i));
        var put = await client.PutFromSlotsAsync(r.ReservationId,
            chain.Select((h, i) => new SlotBlockToPut(h, i == 0 ? ReadOnlyMemory<byte>.Empty : chain[i - 1], (uint)i, (uint)i, (ulong)fx.BlockBytes)));
        Assert.Equal(2u, put.Stored);

        ReserveResponse back = await client.ReserveAsync(2);
        Tier[] tiers = await client.GetIntoSlotsAsync(TestBlocks.Packed(chain), back.ReservationId);
        Assert.Equal(2, tiers.Length);
        for (int i = 0; i < 2; i++)
            Assert.Equal(TestBlocks.Bytes(fx.BlockBytes, 300 + i), ReadSlot(back.Slots[i]));
        Assert.True((await client.ReleaseAsync(back.ReservationId)).Released);
        Assert.False((await client.ReleaseAsync(back.ReservationId)).Released);
        await client.ReleaseAsync(r.ReservationId);
    }

    [Fact]
    public async Task Pinned_blocks_survive_delete_until_unpinned()
    {
        using var client = fx.Client();
        var chain = TestBlocks.Chain("pin", 3);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 9));
        PinResponse pin = await client.PinAsync(TestBlocks.Packed(chain[..1]), TimeSpan.FromMinutes(1));
        Assert.Equal(1u, pin.Pinned);
        // Deleting the pinned root removes its unpinned descendants and keeps the root.
        Assert.Equal(2u, (await client.DeleteAsync(TestBlocks.Packed(chain[..1]))).Deleted);
        Assert.Equal(1u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
        // Now nothing can go: the call says so and changes nothing.
        var pinned = await Assert.ThrowsAsync<RpcException>(() => client.DeleteAsync(TestBlocks.Packed(chain[..1])));
        Assert.Equal(StatusCode.FailedPrecondition, pinned.Status);
        Assert.Equal(1u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
        Assert.True((await client.UnpinAsync(pin.LeaseId)).Released);
        Assert.Equal(1u, (await client.DeleteAsync(TestBlocks.Packed(chain[..1]))).Deleted);
        Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
    }

    [Fact]
    public async Task A_deadline_shorter_than_the_call_ends_it_with_deadline_exceeded()
    {
        using var client = fx.Client();
        // SubscribeEvents waits for events that never come: the deadline must end it on both sides.
        await using var call = client.SubscribeEvents(ulong.MaxValue - 1, new CallOptions(Deadline: TimeSpan.FromMilliseconds(300)));
        var e = await Assert.ThrowsAsync<RpcException>(async () => await call.ReadToEndAsync());
        Assert.Equal(StatusCode.DeadlineExceeded, e.Status);
    }

    [Fact]
    public async Task Health_check_needs_no_token_and_unknown_services_are_not_found()
    {
        using var anonymous = new FabricClient(new RpcChannelOptions { Address = new Uri(fx.Address) });
        Assert.Equal(Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus.Serving, (await anonymous.CheckHealthAsync()).Status);
        Assert.Equal(Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus.Serving, (await anonymous.CheckHealthAsync("kvfabric.v1.Fabric")).Status);
        Assert.Equal(StatusCode.NotFound, (await Assert.ThrowsAsync<RpcException>(() => anonymous.CheckHealthAsync("no.such.Service"))).Status);
    }

    private static void WriteSlot(Slot slot, byte[] bytes)
    {
        using var fs = new FileStream(slot.Path, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite);
        fs.Seek((long)slot.Offset, SeekOrigin.Begin);
        fs.Write(bytes);
    }

    private static byte[] ReadSlot(Slot slot)
    {
        using var fs = new FileStream(slot.Path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        fs.Seek((long)slot.Offset, SeekOrigin.Begin);
        var bytes = new byte[(int)slot.Length];
        fs.ReadExactly(bytes);
        return bytes;
    }
}
