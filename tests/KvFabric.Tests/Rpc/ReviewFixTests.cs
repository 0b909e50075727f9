using Google.Protobuf;
using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using KvFabric.Rpc.V1;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>Regressions for what review found in the service over the tiers.</summary>
public sealed class ReviewFixTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    [Fact]
    public async Task A_failed_put_undoes_only_the_blocks_it_stored()
    {
        using var client = fx.Client();
        var x = TestBlocks.Chain("undo-x", 1);
        await client.PutAsync(TestBlocks.ToPut(x, fx.BlockBytes, 1));
        var w = TestBlocks.Chain("undo-w", 1)[0];
        var orphanParent = TestBlocks.Chain("undo-missing", 1)[0];
        var q = TestBlocks.Chain("undo-q", 1)[0];
        var blocks = new[]
        {
            new BlockToPut(x[0], ReadOnlyMemory<byte>.Empty, 0, TestBlocks.Bytes(fx.BlockBytes, 1)), // present before
            new BlockToPut(w, x[0], 1, TestBlocks.Bytes(fx.BlockBytes, 2)),                          // stored by this call
            new BlockToPut(q, orphanParent, 5, TestBlocks.Bytes(fx.BlockBytes, 3)),                  // its parent is absent
        };
        var e = await Assert.ThrowsAsync<RpcException>(() => client.PutAsync(blocks));
        Assert.Equal(StatusCode.FailedPrecondition, e.Status);
        Assert.Equal(1u, (await client.LookupAsync(TestBlocks.Packed([x[0], w]))).MatchedBlocks); // X stays, W undone
    }

    [Fact]
    public async Task Removing_a_leaf_never_takes_a_block_with_children()
    {
        const int bytes = 64;
        using var manager = new TierManager(new TierManagerOptions
        {
            Tiers = [new TierOptions { Store = new KeyOnlyBlockStore(TierKind.Host, 16 * bytes), Policy = new LruPolicy(16) }],
        });
        var a = new BlockHash(1, 1);
        var b = new BlockHash(2, 2);
        await manager.PutAsync(7, null, [new BlockPut(a, new byte[bytes]), new BlockPut(b, new byte[bytes])]);
        Assert.False(await manager.RemoveLeafAsync(7, a)); // b builds on it
        Assert.True(await manager.RemoveLeafAsync(7, b));
        Assert.True(await manager.RemoveLeafAsync(7, a));
        Assert.Equal(0, manager.Lookup(7, [a]).Matched);
    }

    [Fact]
    public async Task A_streamed_put_refused_early_reports_the_servers_status()
    {
        // Far more bytes than HTTP/2 flow control lets through before the server answers: the client's writes break,
        // and it must still report why the server refused (not the broken write).
        using var client = new FabricClient(new RpcChannelOptions { Address = new Uri(fx.Address), Tenant = "alpha", Token = "alpha-token" })
        {
            PutChunkBytes = 64 * 1024,
        };
        var hash = TestBlocks.Chain("early-refusal", 1)[0];
        var huge = new BlockToPut(hash, ReadOnlyMemory<byte>.Empty, 0, new byte[48 << 20]);
        var e = await Assert.ThrowsAsync<RpcException>(() => client.PutAsync([huge]));
        Assert.Equal(StatusCode.InvalidArgument, e.Status);
        Assert.Contains("block_length", e.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task A_put_naming_two_reservations_is_refused()
    {
        using var client = fx.Client();
        ReserveResponse r1 = await client.ReserveAsync(1), r2 = await client.ReserveAsync(1);
        var chain = TestBlocks.Chain("two-reservations", 2);
        var e = await Assert.ThrowsAsync<RpcException>(async () =>
        {
            // Raw messages: the second block names another reservation than the first.
            await using var call = client.Channel.Streaming<PutRequest, PutResponse>("/kvfabric.v1.Fabric/Put", PutResponse.Parser);
            await call.WriteAsync(new PutRequest { Hash = ByteString.CopyFrom(chain[0]), BlockLength = (ulong)fx.BlockBytes, ReservationId = r1.ReservationId });
            await call.WriteAsync(new PutRequest
            {
                Hash = ByteString.CopyFrom(chain[1]), ParentHash = ByteString.CopyFrom(chain[0]), Depth = 1,
                BlockLength = (ulong)fx.BlockBytes, ReservationId = r2.ReservationId,
            });
            await call.ResponseAsync();
        });
        Assert.Equal(StatusCode.InvalidArgument, e.Status);
        Assert.Contains("one reservation", e.Detail, StringComparison.Ordinal);
        await client.ReleaseAsync(r1.ReservationId);
        await client.ReleaseAsync(r2.ReservationId);
    }

    [Fact]
    public async Task Subscribing_from_beyond_the_last_event_starts_with_a_snapshot()
    {
        using var client = fx.Client("beta");
        var chain = TestBlocks.Chain("snapshot-from-the-future", 2);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 4));
        // As after the node restarted: the subscriber's sequence is ahead of this incarnation's.
        await using var events = client.SubscribeEvents(1_000_000, new CallOptions(Deadline: TimeSpan.FromSeconds(20)));
        // Stored runs (a chain's blocks in one event), then SnapshotEnd counting them.
        var seen = new List<byte[]>();
        ulong ended = ulong.MaxValue;
        while (await events.ReadAsync() is { } e)
        {
            Assert.True(e.Snapshot);
            if (e.SnapshotEnd is { } end)
            {
                ended = end.Blocks;
                break;
            }

            for (int i = 0; i < e.Stored.Hashes.Length; i += 16)
                seen.Add(e.Stored.Hashes.Span.Slice(i, 16).ToArray());
        }

        Assert.Equal((ulong)seen.Count, ended);
        Assert.Contains(seen, h => h.SequenceEqual(chain[0]));
        Assert.Contains(seen, h => h.SequenceEqual(chain[1]));
    }

    [Fact]
    public void Tenant_ids_depend_on_the_name_only()
    {
        var a = new TenantRegistry([new TenantConfig("alpha", "t1"), new TenantConfig("beta", "t2")]);
        var b = new TenantRegistry([new TenantConfig("beta", "t2"), new TenantConfig("alpha", "t1")]);
        Assert.Equal(a.All.Single(t => t.Name == "alpha").Id, b.All.Single(t => t.Name == "alpha").Id);
        Assert.Equal(TenantRegistry.IdOf("beta"), b.All.Single(t => t.Name == "beta").Id);
        Assert.Throws<ArgumentException>(() => new TenantRegistry([new TenantConfig("x", "same"), new TenantConfig("y", "same")]));
    }
}

/// <summary>Regressions for the second review: a Put cancelled while it commits, a subscriber from another incarnation.</summary>
public sealed class SecondReviewFixTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    /// <summary>A key-only store that cancels a token after its first write: a client giving up mid-commit.</summary>
    private sealed class CancellingStore(TierKind kind, long capacity, CancellationTokenSource cts) : IBlockStore
    {
        private readonly KeyOnlyBlockStore _inner = new(kind, capacity);
        public TierKind Kind => kind;
        public long CapacityBytes => capacity;
        public long UsedBytes => _inner.UsedBytes;
        public int Count => _inner.Count;
        public bool Contains(BlockKey key) => _inner.Contains(key);

        public async ValueTask<bool> WriteAsync(BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> block, CancellationToken cancellationToken = default)
        {
            bool ok = await _inner.WriteAsync(key, meta, block, cancellationToken);
            await cts.CancelAsync();
            return ok;
        }

        public ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default) =>
            _inner.ReadAsync(key, destination, cancellationToken);

        public bool Remove(BlockKey key) => _inner.Remove(key);
        public void Dispose() => _inner.Dispose();
    }

    [Fact]
    public async Task A_put_cancelled_while_it_commits_stores_nothing()
    {
        var layout = SidecarFixture.SmallLayout;
        using var cts = new CancellationTokenSource();
        using var store = new KvFabric.Service.TieredFabricStore(layout, "n", 8, sink => new TierManager(new TierManagerOptions
        {
            Tiers = [new TierOptions { Store = new CancellingStore(TierKind.Host, 16 * layout.BlockBytes, cts), Policy = new LruPolicy(16) }],
            Events = sink,
        }));
        var chain = TestBlocks.Chain("cancel-mid-commit", 3).Select(h => BlockHash.FromBytes(h)).ToArray();
        using (var batch = store.BeginPut(1))
        {
            for (int i = 0; i < chain.Length; i++)
                batch.Add(chain[i], i == 0 ? null : chain[i - 1], i);
            await Assert.ThrowsAnyAsync<OperationCanceledException>(async () => await batch.CommitAsync(cts.Token));
        }

        Assert.Equal(0, store.Lookup(1, chain, new TierKind[chain.Length]));
    }

    [Fact]
    public async Task A_subscriber_from_another_incarnation_starts_with_a_snapshot()
    {
        using var client = fx.Client("beta");
        var chain = TestBlocks.Chain("other-incarnation", 1);
        await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 8));
        await using var events = client.SubscribeEvents(1, new CallOptions(Deadline: TimeSpan.FromSeconds(20)), incarnation: 12345);
        KvFabric.Rpc.V1.KvEvent? first = await events.ReadAsync();
        Assert.NotNull(first);
        Assert.True(first.Snapshot);
        Assert.NotEqual(12345ul, first.Incarnation);
    }
}
