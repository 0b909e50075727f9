using System.Buffers;
using Google.Protobuf;
using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;

namespace KvFabric.Client;

/// <summary>A block to Put: its 16-byte hash, its parent's (empty for a chain's first block), its depth and its bytes.</summary>
public readonly record struct BlockToPut(ReadOnlyMemory<byte> Hash, ReadOnlyMemory<byte> ParentHash, uint Depth, ReadOnlyMemory<byte> Bytes);

/// <summary>A block whose bytes already sit in slot SlotIndex of a reservation (node-local zero-copy Put).</summary>
public readonly record struct SlotBlockToPut(ReadOnlyMemory<byte> Hash, ReadOnlyMemory<byte> ParentHash, uint Depth, uint SlotIndex, ulong BlockLength);

/// <summary>
/// The typed client of a KvFabric sidecar: every call of kvfabric.v1 Fabric, Index and Transfer, and grpc.health.v1.
/// Hash chains are packed (16 bytes per block, chain order): see <see cref="HashChain"/>. Idempotent calls
/// (Lookup, Stats, Match, Route, GetMetadata, health Check, Delete, Unpin, Release) are retried on UNAVAILABLE.
/// </summary>
public sealed class FabricClient : IDisposable
{
    private const string Fabric = "/kvfabric.v1.Fabric/";
    private const string Index = "/kvfabric.v1.Index/";
    private const string TransferSvc = "/kvfabric.v1.Transfer/";
    private const string Health = "/grpc.health.v1.Health/";
    private readonly bool _ownsChannel;

    public FabricClient(RpcChannelOptions options) : this(new RpcChannel(options)) => _ownsChannel = true;

    public FabricClient(RpcChannel channel)
    {
        Channel = channel ?? throw new ArgumentNullException(nameof(channel));
    }

    /// <summary>A client for a sidecar at address, e.g. "http://127.0.0.1:50051", with a tenant and its token.</summary>
    public static FabricClient Connect(string address, string tenant, string token) =>
        new(new RpcChannelOptions { Address = new Uri(address), Tenant = tenant, Token = token });

    public RpcChannel Channel { get; }

    /// <summary>Largest data chunk per streamed Put message.</summary>
    public int PutChunkBytes { get; init; } = 1 << 20;

    public Task<LookupResponse> LookupAsync(ReadOnlyMemory<byte> packedHashes, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Lookup", new LookupRequest { Hashes = Wrap(packedHashes) }, LookupResponse.Parser, options, idempotent: true);

    public Task<ReserveResponse> ReserveAsync(uint blocks, TimeSpan? lease = null, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Reserve", new ReserveRequest { Blocks = blocks, LeaseMs = Ms(lease) }, ReserveResponse.Parser, options);

    public Task<ReleaseResponse> ReleaseAsync(ulong reservationId, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Release", new ReleaseRequest { ReservationId = reservationId }, ReleaseResponse.Parser, options, idempotent: true);

    /// <summary>Streams blocks to the node (chunked); all are stored or none.</summary>
    public async Task<PutResponse> PutAsync(IEnumerable<BlockToPut> blocks, CallOptions options = default)
    {
        ArgumentNullException.ThrowIfNull(blocks);
        await using var call = Channel.Streaming<PutRequest, PutResponse>(Fabric + "Put", PutResponse.Parser, options);
        var message = new PutRequest();
        foreach (BlockToPut b in blocks)
        {
            ReadOnlyMemory<byte> bytes = b.Bytes;
            int offset = 0;
            do
            {
                int n = Math.Min(PutChunkBytes, bytes.Length - offset);
                message.Hash = offset == 0 ? Wrap(b.Hash) : ByteString.Empty;
                message.ParentHash = offset == 0 ? Wrap(b.ParentHash) : ByteString.Empty;
                message.Depth = offset == 0 ? b.Depth : 0;
                message.BlockLength = offset == 0 ? (ulong)bytes.Length : 0;
                message.Data = UnsafeByteOperations.UnsafeWrap(bytes.Slice(offset, n));
                await call.WriteAsync(message).ConfigureAwait(false);
                offset += n;
            }
            while (offset < bytes.Length);
        }

        return await call.ResponseAsync().ConfigureAwait(false);
    }

    /// <summary>Stores blocks whose bytes the caller placed in reserved shared-memory slots; all or none.</summary>
    public async Task<PutResponse> PutFromSlotsAsync(ulong reservationId, IEnumerable<SlotBlockToPut> blocks, CallOptions options = default)
    {
        ArgumentNullException.ThrowIfNull(blocks);
        await using var call = Channel.Streaming<PutRequest, PutResponse>(Fabric + "Put", PutResponse.Parser, options);
        foreach (SlotBlockToPut b in blocks)
        {
            await call.WriteAsync(new PutRequest
            {
                Hash = Wrap(b.Hash), ParentHash = Wrap(b.ParentHash), Depth = b.Depth, BlockLength = b.BlockLength,
                ReservationId = reservationId, SlotIndex = b.SlotIndex,
            }).ConfigureAwait(false);
        }

        return await call.ResponseAsync().ConfigureAwait(false);
    }

    /// <summary>
    /// Fetches blocks into destination, one after another (block i at i * blockBytes), and returns the tier each came from.
    /// NOT_FOUND (nothing written) when a block is absent.
    /// </summary>
    public async Task<Tier[]> GetAsync(ReadOnlyMemory<byte> packedHashes, Memory<byte> destination, int blockBytes,
        uint chunkBytes = 0, CallOptions options = default)
    {
        int count = HashChain.Count(packedHashes);
        if (destination.Length < (long)count * blockBytes)
            throw new ArgumentException($"destination holds {destination.Length} bytes; {count} blocks of {blockBytes} need {(long)count * blockBytes}", nameof(destination));
        var tiers = new Tier[count];
        await using var call = Channel.ServerStreaming(Fabric + "Get", new GetRequest { Hashes = Wrap(packedHashes), ChunkBytes = chunkBytes },
            GetResponse.Parser, options);
        // Fast path: parse the body as it arrives and read each chunk straight into place.
        if (await call.OpenRawBodyAsync().ConfigureAwait(false) is { } body)
        {
            int blocks;
            try
            {
                blocks = await new RawGetReader(body, Channel.Options.MaxReceiveMessageBytes, call.RawToken)
                    .ReadAllAsync(destination, blockBytes, count, tiers).ConfigureAwait(false);
            }
            catch (Exception e) when (e is not RpcException)
            {
                throw await call.RawFailureAsync(e).ConfigureAwait(false);
            }

            call.EndRaw();
            if (blocks != count)
                throw new RpcException(StatusCode.Internal, $"Get: the server sent {blocks} blocks of the {count} asked for");
            return tiers;
        }

        int block = -1;
        // Each chunk is decoded from the wire bytes and copied once, straight to its place in destination.
        Func<System.Buffers.ReadOnlySequence<byte>, object> place = message =>
        {
            var h = GetResponseDecoder.Decode(message, out var data);
            if (h.StartsBlock)
            {
                block++;
                if (block >= count || h.BlockLength != (ulong)blockBytes)
                    throw new RpcException(StatusCode.Internal, $"Get: the server sent block {block} of {h.BlockLength} bytes; expected {count} blocks of {blockBytes}");
                tiers[block] = (Tier)h.Tier;
            }

            if (block < 0 || h.Offset > (ulong)blockBytes || (ulong)h.DataLength > (ulong)blockBytes - h.Offset)
                throw new RpcException(StatusCode.Internal, $"Get: chunk at offset {h.Offset} of {h.DataLength} bytes does not fit block {block}");
            data.CopyTo(destination.Span[(block * blockBytes + (int)h.Offset)..]);
            return tiers;
        };
        while (await call.ReadAsync(place).ConfigureAwait(false) is not null)
        {
        }

        if (block != count - 1)
            throw new RpcException(StatusCode.Internal, $"Get: the server sent {block + 1} blocks of the {count} asked for");
        return tiers;
    }

    /// <summary>The raw Get stream (block headers and data chunks), for callers that place bytes themselves.</summary>
    public GrpcCall<GetRequest, GetResponse> GetStream(GetRequest request, CallOptions options = default) =>
        Channel.ServerStreaming(Fabric + "Get", request, GetResponse.Parser, options);

    /// <summary>Copies blocks into the slots of a reservation (block i into slot i); returns the tier of each.</summary>
    public async Task<Tier[]> GetIntoSlotsAsync(ReadOnlyMemory<byte> packedHashes, ulong reservationId, CallOptions options = default)
    {
        var tiers = new List<Tier>();
        await using var call = GetStream(new GetRequest { Hashes = Wrap(packedHashes), ReservationId = reservationId }, options);
        while (await call.ReadAsync().ConfigureAwait(false) is { } r)
            tiers.Add(r.Tier);
        return tiers.ToArray();
    }

    public Task<PinResponse> PinAsync(ReadOnlyMemory<byte> packedHashes, TimeSpan? lease = null, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Pin", new PinRequest { Hashes = Wrap(packedHashes), LeaseMs = Ms(lease) }, PinResponse.Parser, options);

    public Task<UnpinResponse> UnpinAsync(ulong leaseId, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Unpin", new UnpinRequest { LeaseId = leaseId }, UnpinResponse.Parser, options, idempotent: true);

    public Task<DeleteResponse> DeleteAsync(ReadOnlyMemory<byte> packedHashes, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Delete", new DeleteRequest { Hashes = Wrap(packedHashes) }, DeleteResponse.Parser, options, idempotent: true);

    public Task<StatsResponse> StatsAsync(CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Stats", new StatsRequest(), StatsResponse.Parser, options, idempotent: true);

    public Task<MatchResponse> MatchAsync(ReadOnlyMemory<byte> packedHashes, CallOptions options = default) =>
        Channel.UnaryAsync(Index + "Match", new MatchRequest { Hashes = Wrap(packedHashes) }, MatchResponse.Parser, options, idempotent: true);

    public Task<RouteResponse> RouteAsync(ReadOnlyMemory<byte> packedHashes, double temperature = 0, ulong seed = 0, CallOptions options = default) =>
        Channel.UnaryAsync(Index + "Route", new RouteRequest { Hashes = Wrap(packedHashes), Temperature = temperature, Seed = seed },
            RouteResponse.Parser, options, idempotent: true);

    /// <summary>The node's KV events from a sequence number on; read until the caller cancels (or the deadline).</summary>
    /// <param name="tenant">Admin tenants only: another tenant's events (the cluster's index replicas); null: the caller's own.</param>
    public GrpcCall<SubscribeEventsRequest, KvEvent> SubscribeEvents(ulong fromSequence, CallOptions options = default, ulong incarnation = 0, string? tenant = null) =>
        Channel.ServerStreaming(Index + "SubscribeEvents", new SubscribeEventsRequest { FromSequence = fromSequence, Incarnation = incarnation, Tenant = tenant ?? string.Empty },
            KvEvent.Parser, options with { Deadline = options.Deadline ?? Timeout.InfiniteTimeSpan });

    /// <summary>Makes the longest prefix of the chain cached anywhere in the cluster local to this node (see Fabric.Fetch).</summary>
    public Task<FetchResponse> FetchAsync(ReadOnlyMemory<byte> packedHashes, CallOptions options = default) =>
        Channel.UnaryAsync(Fabric + "Fetch", new FetchRequest { Hashes = Wrap(packedHashes) }, FetchResponse.Parser, options, idempotent: true);

    /// <summary>Admin: copies a tenant's blocks into the node's registered staging memory for a peer to READ.</summary>
    public Task<ExportResponse> ExportAsync(string tenant, ReadOnlyMemory<byte> packedHashes, TimeSpan? lease = null, CallOptions options = default) =>
        Channel.UnaryAsync(TransferSvc + "Export", new ExportRequest
        {
            Tenant = tenant, Hashes = Wrap(packedHashes), LeaseMs = (uint)(lease ?? TimeSpan.Zero).TotalMilliseconds,
        }, ExportResponse.Parser, options);

    public Task<ReleaseExportResponse> ReleaseExportAsync(string tenant, ulong exportId, CallOptions options = default) =>
        Channel.UnaryAsync(TransferSvc + "ReleaseExport", new ReleaseExportRequest { Tenant = tenant, ExportId = exportId },
            ReleaseExportResponse.Parser, options, idempotent: true);

    public Task<GetMetadataResponse> GetMetadataAsync(CallOptions options = default) =>
        Channel.UnaryAsync(TransferSvc + "GetMetadata", new GetMetadataRequest(), GetMetadataResponse.Parser, options, idempotent: true);

    public Task<LoadMetadataResponse> LoadMetadataAsync(ReadOnlyMemory<byte> metadata, CallOptions options = default) =>
        Channel.UnaryAsync(TransferSvc + "LoadMetadata", new LoadMetadataRequest { Metadata = Wrap(metadata) }, LoadMetadataResponse.Parser, options);

    public Task<NotifyResponse> NotifyAsync(string agentId, ReadOnlyMemory<byte> message, CallOptions options = default) =>
        Channel.UnaryAsync(TransferSvc + "Notify", new NotifyRequest { AgentId = agentId, Message = Wrap(message) }, NotifyResponse.Parser, options);

    public Task<HealthCheckResponse> CheckHealthAsync(string service = "", CallOptions options = default) =>
        Channel.UnaryAsync(Health + "Check", new HealthCheckRequest { Service = service }, HealthCheckResponse.Parser, options, idempotent: true);

    public GrpcCall<HealthCheckRequest, HealthCheckResponse> WatchHealth(string service = "", CallOptions options = default) =>
        Channel.ServerStreaming(Health + "Watch", new HealthCheckRequest { Service = service }, HealthCheckResponse.Parser,
            options with { Deadline = options.Deadline ?? Timeout.InfiniteTimeSpan });

    private static ByteString Wrap(ReadOnlyMemory<byte> bytes) => bytes.IsEmpty ? ByteString.Empty : UnsafeByteOperations.UnsafeWrap(bytes);

    private static uint Ms(TimeSpan? t) => t is { } v ? (uint)Math.Clamp(v.TotalMilliseconds, 1, uint.MaxValue) : 0;

    public void Dispose()
    {
        if (_ownsChannel)
            Channel.Dispose();
    }
}

/// <summary>Packs 16-byte block hashes into the wire's chain form.</summary>
public static class HashChain
{
    public const int HashBytes = 16;

    public static byte[] Pack(IEnumerable<ReadOnlyMemory<byte>> hashes)
    {
        ArgumentNullException.ThrowIfNull(hashes);
        var list = hashes.ToList();
        byte[] packed = new byte[list.Count * HashBytes];
        for (int i = 0; i < list.Count; i++)
        {
            if (list[i].Length != HashBytes)
                throw new ArgumentException($"hash {i} is {list[i].Length} bytes; block hashes are {HashBytes} bytes", nameof(hashes));
            list[i].Span.CopyTo(packed.AsSpan(i * HashBytes));
        }

        return packed;
    }

    public static int Count(ReadOnlyMemory<byte> packed) =>
        packed.Length % HashBytes == 0 ? packed.Length / HashBytes
            : throw new ArgumentException($"a packed chain is a multiple of {HashBytes} bytes; got {packed.Length}", nameof(packed));
}
