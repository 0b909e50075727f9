using Google.Protobuf;
using KvFabric.Blocks;
using KvFabric.Client.Grpc;
using KvFabric.Tiers;

namespace KvFabric.Rpc;

/// <summary>Conversions between the wire's packed hash chains and tiers and the fabric's types, with precise errors.</summary>
internal static class Hashes
{
    public const int MaxChain = 65536;

    public static BlockHash[] Parse(ByteString packed, string field, bool requireOne)
    {
        if (packed.Length % BlockHash.Size != 0)
        {
            throw new RpcException(StatusCode.InvalidArgument,
                $"{field} must hold packed 16-byte block hashes; got {packed.Length} bytes, not a multiple of 16");
        }

        int n = packed.Length / BlockHash.Size;
        if (requireOne && n == 0)
            throw new RpcException(StatusCode.InvalidArgument, $"{field} is empty; give at least one 16-byte block hash");
        if (n > MaxChain)
            throw new RpcException(StatusCode.InvalidArgument, $"{field} holds {n} hashes; at most {MaxChain} per call");
        var hashes = new BlockHash[n];
        ReadOnlySpan<byte> span = packed.Span;
        for (int i = 0; i < n; i++)
            hashes[i] = BlockHash.FromBytes(span.Slice(i * BlockHash.Size, BlockHash.Size));
        return hashes;
    }

    public static BlockHash ParseOne(ByteString bytes, string field) =>
        bytes.Length == BlockHash.Size
            ? BlockHash.FromBytes(bytes.Span)
            : throw new RpcException(StatusCode.InvalidArgument, $"{field} must be a 16-byte block hash; got {bytes.Length} bytes");

    public static ByteString Pack(ReadOnlySpan<BlockHash> hashes)
    {
        byte[] bytes = new byte[hashes.Length * BlockHash.Size];
        for (int i = 0; i < hashes.Length; i++)
            hashes[i].WriteTo(bytes.AsSpan(i * BlockHash.Size));
        return UnsafeByteOperations.UnsafeWrap(bytes);
    }

    public static ByteString Pack(BlockHash hash) => Pack([hash]);

    public static V1.Tier ToWire(TierKind tier) => tier switch
    {
        TierKind.Gpu => V1.Tier.Gpu,
        TierKind.Host => V1.Tier.Host,
        TierKind.Ssd => V1.Tier.Ssd,
        _ => V1.Tier.Unspecified,
    };

    public static bool TryFromWire(V1.Tier tier, out TierKind kind)
    {
        kind = tier switch
        {
            V1.Tier.Gpu => TierKind.Gpu,
            V1.Tier.Host => TierKind.Host,
            _ => TierKind.Ssd,
        };
        return tier is V1.Tier.Gpu or V1.Tier.Host or V1.Tier.Ssd;
    }
}
