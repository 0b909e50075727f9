using System.Buffers;
using Google.Protobuf;
using KvFabric.Blocks;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Service;
using KvFabric.Tiers;

namespace KvFabric.Rpc;

/// <summary>kvfabric.v1.Fabric: Lookup, Reserve/Release, Put, Get, Pin/Unpin, Delete, Stats over an IFabricStore.</summary>
public sealed class FabricService(IFabricStore store, StagingArea staging, RpcMetrics metrics, int maxSendMessageBytes, Cluster.ClusterNode? cluster = null)
{
    public const string Name = "kvfabric.v1.Fabric";
    public static readonly TimeSpan DefaultLease = TimeSpan.FromSeconds(30);
    public static readonly TimeSpan MaxLease = TimeSpan.FromHours(1);
    private const int MaxReserve = 1024;
    public const int MaxGetBlocks = 1024;

    private IFabricStore Store => store;

    public void Register(GrpcRouter router)
    {
        router.Unary<LookupRequest, LookupResponse>($"/{Name}/Lookup", LookupRequest.Parser, (r, c) => Task.FromResult(Lookup(r, c)));
        router.Unary<ReserveRequest, ReserveResponse>($"/{Name}/Reserve", ReserveRequest.Parser, (r, c) => Task.FromResult(Reserve(r, c)),
            undelivered: (_, response, c) => staging.Release(c.RequiredTenant.Id, response.ReservationId));
        router.Unary<ReleaseRequest, ReleaseResponse>($"/{Name}/Release", ReleaseRequest.Parser,
            (r, c) => Task.FromResult(new ReleaseResponse { Released = staging.Release(c.RequiredTenant.Id, r.ReservationId) }));
        router.ClientStreaming($"/{Name}/Put", PutAsync);
        router.Unary<FetchRequest, FetchResponse>($"/{Name}/Fetch", FetchRequest.Parser, FetchAsync);
        router.ServerStreaming<GetRequest>($"/{Name}/Get", GetRequest.Parser, GetAsync);
        router.Unary<PinRequest, PinResponse>($"/{Name}/Pin", PinRequest.Parser, (r, c) => Task.FromResult(Pin(r, c)),
            undelivered: (_, response, c) => store.Unpin(c.RequiredTenant.Id, response.LeaseId));
        router.Unary<UnpinRequest, UnpinResponse>($"/{Name}/Unpin", UnpinRequest.Parser,
            (r, c) => Task.FromResult(new UnpinResponse { Released = store.Unpin(c.RequiredTenant.Id, r.LeaseId) }));
        router.Unary<DeleteRequest, DeleteResponse>($"/{Name}/Delete", DeleteRequest.Parser, DeleteAsync);
        router.Unary<StatsRequest, StatsResponse>($"/{Name}/Stats", StatsRequest.Parser, (_, c) => Task.FromResult(Stats(c)));
    }

    private LookupResponse Lookup(LookupRequest request, ServerCall call)
    {
        BlockHash[] chain = Hashes.Parse(request.Hashes, "hashes", requireOne: false);
        var tiers = new TierKind[chain.Length];
        int matched = store.Lookup(call.RequiredTenant.Id, chain, tiers);
        var response = new LookupResponse { MatchedBlocks = (uint)matched };
        for (int i = 0; i < matched; i++)
            response.Tiers.Add(Hashes.ToWire(tiers[i]));
        return response;
    }

    private async Task<FetchResponse> FetchAsync(FetchRequest request, ServerCall call)
    {
        BlockHash[] chain = Hashes.Parse(request.Hashes, "hashes", requireOne: true);
        if (chain.Length > MaxGetBlocks)
            throw new RpcException(StatusCode.InvalidArgument, $"{chain.Length} blocks asked for; fetch at most {MaxGetBlocks} per call");
        Rpc.Tenant tenant = call.RequiredTenant;
        if (cluster is null)
        {
            // Standalone: nothing to fetch from; say how much is here.
            var tiers = new Tiers.TierKind[chain.Length];
            return new FetchResponse { LocalBlocks = (uint)store.Lookup(tenant.Id, chain, tiers) };
        }

        return await cluster.FetchAsync(tenant.Id, tenant.Name, chain, call.TimeLeft, call.CancellationToken).ConfigureAwait(false);
    }

    private ReserveResponse Reserve(ReserveRequest request, ServerCall call)
    {
        if (request.Blocks is 0 or > MaxReserve)
            throw new RpcException(StatusCode.InvalidArgument, $"blocks must be 1..{MaxReserve}; got {request.Blocks}");
        TimeSpan lease = LeaseOf(request.LeaseMs);
        try
        {
            var (id, slots, expires) = staging.Reserve(call.RequiredTenant.Id, (int)request.Blocks, lease);
            var response = new ReserveResponse { ReservationId = id, ExpiresUnixMs = (ulong)expires.ToUnixTimeMilliseconds() };
            foreach (StagingSlot s in slots)
                response.Slots.Add(new Slot { Index = (uint)s.Index, Path = s.Path, Offset = (ulong)s.Offset, Length = (ulong)s.Length });
            return response;
        }
        catch (StoreFullException e)
        {
            throw new RpcException(StatusCode.ResourceExhausted, e.Message);
        }
    }

    private async Task<PutResponse> PutAsync(ServerCall call)
    {
        using var put = new PutStream(this, call.RequiredTenant.Id);
        // Each message is decoded from its wire bytes and its data copied once, straight into the staged block.
        Func<ReadOnlySequence<byte>, PutStream> process = put.Process;
        while (await call.ReadAsync(process).ConfigureAwait(false) is not null)
        {
        }

        PutOutcome outcome;
        try
        {
            outcome = await put.CommitAsync(call.CancellationToken).ConfigureAwait(false);
        }
        catch (StoreFullException e)
        {
            throw new RpcException(StatusCode.ResourceExhausted, e.Message);
        }
        catch (BlockNotFoundException e)
        {
            throw new RpcException(StatusCode.FailedPrecondition, e.Message);
        }
        catch (TierException e)
        {
            throw new RpcException(StatusCode.Unavailable, $"the node could not store the blocks: {e.Message}; nothing from this Put was stored; retry later or on another node");
        }
        metrics.BytesIn.Add(put.Received, "put");
        call.BytesReceived = put.Received;
        return new PutResponse
        {
            Stored = (uint)outcome.Stored, AlreadyPresent = (uint)outcome.AlreadyPresent, NotAdmitted = (uint)outcome.NotAdmitted,
            BytesReceived = (ulong)put.Received,
        };
    }

    /// <summary>The state of one Put stream: blocks staged so far and the one being filled.</summary>
    private sealed class PutStream(FabricService service, uint tenant) : IDisposable
    {
        private readonly IPutBatch _batch = service.Store.BeginPut(tenant);
        private readonly int _blockBytes = service.Store.BlockBytes;
        private StagingArea.SlotScope? _slots;
        private ulong _reservation;
        private Memory<byte> _current;
        private BlockHash _hash;
        private int _filled, _blocks;

        public long Received { get; private set; }

        // PutRequest fields (fabric.proto): 1 hash, 2 parent_hash, 3 depth, 4 block_length, 5 data, 6 reservation_id, 7 slot_index.
        public PutStream Process(ReadOnlySequence<byte> message)
        {
            var wire = new ProtoWire(message, StatusCode.InvalidArgument, "PutRequest");
            ReadOnlySequence<byte> hash = default, parent = default, data = default;
            ulong depth = 0, length = 0, reservation = 0, slot = 0;
            while (!wire.End)
            {
                var (field, type) = wire.Tag();
                switch (field)
                {
                    case 1 when type == 2: hash = wire.Bytes(); break;
                    case 2 when type == 2: parent = wire.Bytes(); break;
                    case 3 when type == 0: depth = wire.Varint(); break;
                    case 4 when type == 0: length = wire.Varint(); break;
                    case 5 when type == 2: data = wire.Bytes(); break;
                    case 6 when type == 0: reservation = wire.Varint(); break;
                    case 7 when type == 0: slot = wire.Varint(); break;
                    case >= 1 and <= 7: throw wire.WrongType(field, type);
                    default: wire.Skip(type); break;
                }
            }

            if (!hash.IsEmpty)
            {
                StartBlock(hash, parent, depth, length);
                if (reservation != 0)
                {
                    if (!data.IsEmpty)
                        throw new RpcException(StatusCode.InvalidArgument, $"block {_hash} names a reserved slot and also carries data; use one or the other");
                    if (_slots is not null && reservation != _reservation)
                        throw new RpcException(StatusCode.InvalidArgument, $"block {_hash} names reservation {reservation}, but this Put already uses reservation {_reservation}; one Put takes slots from one reservation");
                    _slots ??= service.UseSlots(tenant, reservation);
                    _reservation = reservation;
                    SlotOf(_slots, reservation, slot > uint.MaxValue ? uint.MaxValue : (uint)slot).Span[.._blockBytes].CopyTo(_current.Span);
                    _filled = _blockBytes;
                    Received += _blockBytes;
                    return this;
                }
            }
            else if (_current.IsEmpty)
            {
                throw new RpcException(StatusCode.InvalidArgument, "a Put message carried data before any block header (set hash and block_length on a block's first message)");
            }

            if (data.IsEmpty)
                return this;
            if (_filled + data.Length > _current.Length)
            {
                throw new RpcException(StatusCode.InvalidArgument,
                    $"block {_hash} got {_filled + data.Length} bytes, more than its block_length of {_blockBytes}; nothing was stored");
            }

            data.CopyTo(_current.Span[_filled..]);
            _filled += (int)data.Length;
            Received += data.Length;
            return this;
        }

        private void StartBlock(ReadOnlySequence<byte> hash, ReadOnlySequence<byte> parent, ulong depth, ulong length)
        {
            if (_filled < _current.Length)
                throw Incomplete(_hash, _filled, _blockBytes, "the next block started");
            _hash = HashOf(hash, $"hash of block {_blocks}");
            BlockHash? parentHash = parent.IsEmpty ? null : HashOf(parent, $"parent_hash of block {_hash}");
            if (length != (ulong)_blockBytes)
            {
                throw new RpcException(StatusCode.InvalidArgument,
                    $"block {_hash} has block_length {length}, but this node's layout ({service.Store.Layout.Describe()}) makes every block exactly {_blockBytes} bytes; nothing was stored");
            }

            if (parentHash is null && depth != 0)
                throw new RpcException(StatusCode.InvalidArgument, $"block {_hash} has depth {depth} but no parent_hash; a chain's first block has depth 0");
            if (depth > int.MaxValue)
                throw new RpcException(StatusCode.InvalidArgument, $"block {_hash} has depth {depth}; at most {int.MaxValue}");
            try
            {
                _current = _batch.Add(_hash, parentHash, (int)depth);
            }
            catch (StoreFullException e)
            {
                throw new RpcException(StatusCode.ResourceExhausted, e.Message + "; nothing from this Put was stored");
            }

            _blocks++;
            _filled = 0;
        }

        private static BlockHash HashOf(ReadOnlySequence<byte> bytes, string field)
        {
            if (bytes.Length != BlockHash.Size)
                throw new RpcException(StatusCode.InvalidArgument, $"{field} must be a 16-byte block hash; got {bytes.Length} bytes");
            Span<byte> h = stackalloc byte[BlockHash.Size];
            bytes.CopyTo(h);
            return BlockHash.FromBytes(h);
        }

        public ValueTask<PutOutcome> CommitAsync(CancellationToken cancellationToken)
        {
            if (_filled < _current.Length)
                throw Incomplete(_hash, _filled, _blockBytes, "the stream ended");
            return _batch.CommitAsync(cancellationToken);
        }

        public void Dispose()
        {
            _slots?.Dispose();
            _batch.Dispose();
        }
    }

    private static RpcException Incomplete(BlockHash hash, int filled, int expected, string what) =>
        new(StatusCode.InvalidArgument, $"block {hash} got {filled} of its {expected} bytes before {what}; nothing was stored");

    private StagingArea.SlotScope UseSlots(uint tenant, ulong reservation)
    {
        try
        {
            return staging.Use(tenant, reservation);
        }
        catch (BlockNotFoundException e)
        {
            throw new RpcException(StatusCode.FailedPrecondition, e.Message);
        }
    }

    private static Memory<byte> SlotOf(StagingArea.SlotScope slots, ulong reservation, uint index)
    {
        if (index >= (uint)slots.Count)
            throw new RpcException(StatusCode.InvalidArgument, $"slot_index {index} is outside reservation {reservation} (slots 0..{slots.Count - 1})");
        return slots.Slot(index);
    }

    // A block outside host memory is read into one of the node's bounded read buffers as its turn comes.
    private async ValueTask<ReadOnlyMemory<byte>> LoadAsync(ReadLease lease, BlockHash hash, ServerCall call)
    {
        try
        {
            return await lease.LoadAsync(call.CancellationToken).ConfigureAwait(false);
        }
        catch (StoreFullException e)
        {
            throw new RpcException(StatusCode.ResourceExhausted, e.Message);
        }
        catch (BlockNotFoundException e)
        {
            throw new RpcException(StatusCode.DataLoss, $"{e.Message}; the blocks before it in this call were sent ({hash} and after were not)");
        }
    }

    private async Task GetAsync(GetRequest request, ServerCall call)
    {
        uint tenant = call.RequiredTenant.Id;
        BlockHash[] hashes = Hashes.Parse(request.Hashes, "hashes", requireOne: true);
        if (hashes.Length > MaxGetBlocks)
            throw new RpcException(StatusCode.InvalidArgument, $"a Get asks for {hashes.Length} blocks; at most {MaxGetBlocks} per call (every block is held while the call streams): split it");
        int chunk = (int)Math.Min(request.ChunkBytes == 0 ? 1u << 20 : request.ChunkBytes, (uint)(maxSendMessageBytes - 64));
        if (chunk < 4096)
            throw new RpcException(StatusCode.InvalidArgument, $"chunk_bytes must be 0 (default) or at least 4096; got {request.ChunkBytes}");

        // Open every block first: the call either finds all of them (and they cannot change while streamed) or none is sent.
        var leases = new ReadLease?[hashes.Length];
        StagingArea.SlotScope? slots = null;
        try
        {
            for (int i = 0; i < hashes.Length; i++)
            {
                leases[i] = await store.OpenReadAsync(tenant, hashes[i], call.CancellationToken).ConfigureAwait(false)
                    ?? throw new RpcException(StatusCode.NotFound, $"block {hashes[i]} (index {i} of the request) is not cached on {store.Node}; nothing was sent");
            }

            if (request.ReservationId != 0)
            {
                slots = UseSlots(tenant, request.ReservationId);
                if (slots.Count < hashes.Length)
                    throw new RpcException(StatusCode.InvalidArgument, $"reservation {request.ReservationId} has {slots.Count} slots for {hashes.Length} blocks");
            }

            long sent = 0;
            var response = new GetResponse();
            for (int i = 0; i < hashes.Length; i++)
            {
                ReadLease lease = leases[i]!;
                ReadOnlyMemory<byte> bytes = await LoadAsync(lease, hashes[i], call).ConfigureAwait(false);
                response.Hash = Hashes.Pack(hashes[i]);
                response.BlockLength = (ulong)bytes.Length;
                response.Tier = Hashes.ToWire(lease.Tier);
                if (slots is not null)
                {
                    bytes.Span.CopyTo(slots.Slot((uint)i).Span);
                    response.InSlot = true;
                    response.Offset = 0;
                    response.Data = ByteString.Empty;
                    call.Write(response);
                }
                else
                {
                    for (int offset = 0; offset < bytes.Length; offset += chunk)
                    {
                        int n = Math.Min(chunk, bytes.Length - offset);
                        response.Offset = (ulong)offset;
                        response.Data = UnsafeByteOperations.UnsafeWrap(bytes.Slice(offset, n));
                        await call.WriteAsync(response).ConfigureAwait(false);
                        response.Hash = ByteString.Empty;
                        response.BlockLength = 0;
                        response.Tier = Tier.Unspecified;
                        sent += n;
                    }
                }

                lease.Dispose();
                leases[i] = null;
            }

            if (slots is not null)
                await call.FlushAsync().ConfigureAwait(false);
            metrics.BytesOut.Add(sent, "get");
            call.BytesSent = sent;
        }
        finally
        {
            slots?.Dispose();
            foreach (ReadLease? l in leases)
                l?.Dispose();
        }
    }

    private PinResponse Pin(PinRequest request, ServerCall call)
    {
        BlockHash[] hashes = Hashes.Parse(request.Hashes, "hashes", requireOne: true);
        try
        {
            PinLease lease = store.Pin(call.RequiredTenant.Id, hashes, LeaseOf(request.LeaseMs));
            return new PinResponse { LeaseId = lease.LeaseId, Pinned = (uint)lease.Pinned, ExpiresUnixMs = (ulong)lease.Expires.ToUnixTimeMilliseconds() };
        }
        catch (BlockNotFoundException e)
        {
            throw new RpcException(StatusCode.NotFound, e.Message);
        }
    }

    private async Task<DeleteResponse> DeleteAsync(DeleteRequest request, ServerCall call)
    {
        BlockHash[] hashes = Hashes.Parse(request.Hashes, "hashes", requireOne: true);
        try
        {
            return new DeleteResponse { Deleted = (uint)await store.DeleteAsync(call.RequiredTenant.Id, hashes, call.CancellationToken).ConfigureAwait(false) };
        }
        catch (BlockPinnedException e)
        {
            throw new RpcException(StatusCode.FailedPrecondition, e.Message);
        }
    }

    private StatsResponse Stats(ServerCall call)
    {
        StoreStats s = store.GetStats(call.RequiredTenant.Id);
        KvLayout l = store.Layout;
        var response = new StatsResponse
        {
            Node = store.Node,
            Layout = new Layout
            {
                ModelFingerprint = l.ModelFingerprint,
                Layers = (uint)l.Layers,
                KvHeads = (uint)l.KvHeads,
                HeadDim = (uint)l.HeadDim,
                Dtype = l.DType.WireName(),
                TokensPerBlock = (uint)l.TokensPerBlock,
                TpSize = (uint)l.TensorParallelSize,
                TpRank = (uint)l.TensorParallelRank,
                BlockBytes = (ulong)l.BlockBytes,
            },
            Lookups = (ulong)s.Lookups,
            LookupHitBlocks = (ulong)s.LookupHitBlocks,
            LookupMissBlocks = (ulong)s.LookupMissBlocks,
            TenantBlocks = (ulong)s.TenantBlocks,
            TenantBytes = (ulong)s.TenantBytes,
        };
        foreach (TierStatsSnapshot t in s.Tiers)
        {
            response.Tiers.Add(new V1.TierStats
            {
                Tier = Hashes.ToWire(t.Tier),
                CapacityBytes = (ulong)t.CapacityBytes,
                UsedBytes = (ulong)t.UsedBytes,
                Blocks = (ulong)t.Blocks,
                Hits = (ulong)t.Hits,
                Evictions = (ulong)t.Evictions,
                Implementation = t.Implementation,
            });
        }

        return response;
    }

    private static TimeSpan LeaseOf(uint ms)
    {
        if (ms == 0)
            return DefaultLease;
        var lease = TimeSpan.FromMilliseconds(ms);
        return lease <= MaxLease
            ? lease
            : throw new RpcException(StatusCode.InvalidArgument, $"lease_ms {ms} is longer than the maximum of {MaxLease.TotalMilliseconds} (1 hour)");
    }
}
