using System.Buffers;
using System.Diagnostics;
using System.Diagnostics.CodeAnalysis;
using System.Runtime.CompilerServices;
using System.Security.Cryptography;

namespace KvFabric.Blocks;

// The chained block hash, spec version 1 (docs/hashing.md is the normative text; keep the two in step).
// Hot path: no allocations. Messages are built in a stack buffer, or for large blocks in a pooled array.
public static class BlockHasher
{
    public const int SpecVersion = 1;
    public const int MaxNamespaceBytes = 256;

    // 4 KiB covers blocks of up to ~1000 tokens on the stack; larger ones rent.
    private const int StackBufferBytes = 4096;

    // Tag + parent + token count + extra length.
    private const int BlockFixedBytes = 17 + BlockHash.Size + 4 + 4;

    private static ReadOnlySpan<byte> RootTag => "kvfabric.root/v1"u8;

    private static ReadOnlySpan<byte> BlockTag => "kvfabric.block/v1"u8;

    [SkipLocalsInit]
    public static BlockHash Root(string tenantNamespace, KvLayout layout)
    {
        int namespaceBytes = SpecEncoding.Utf8Length(tenantNamespace, nameof(tenantNamespace), "The tenant namespace", MaxNamespaceBytes);
        ArgumentNullException.ThrowIfNull(layout);
        int canonicalBytes = layout.CanonicalLength;

        const int MaxRootMessage = 16 + 4 + MaxNamespaceBytes + 4 + KvLayout.MaxCanonicalLength;
        Span<byte> message = stackalloc byte[MaxRootMessage];
        var writer = new SpecWriter(message);
        writer.Raw(RootTag);
        writer.Str(tenantNamespace, namespaceBytes);
        writer.U32((uint)canonicalBytes);
        layout.WriteCanonical(writer.Take(canonicalBytes));
        return Digest(message[..writer.Position]);
    }

    [SkipLocalsInit]
    public static BlockHash Next(BlockHash parent, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKeys = default)
    {
        if (tokens.IsEmpty)
        {
            ThrowHelper.EmptyBlock();
        }

        ThrowIfAnyNegative(tokens);
        int length = BlockMessageLength(tokens.Length, extraKeys.Length);
        byte[]? rented = null;
        Span<byte> buffer = length <= StackBufferBytes
            ? stackalloc byte[StackBufferBytes]
            : (rented = ArrayPool<byte>.Shared.Rent(length));
        try
        {
            return HashBlock(parent, tokens, extraKeys, buffer[..length]);
        }
        finally
        {
            ReturnScrubbed(rented);
        }
    }

    public static int ComputeChain(
        string tenantNamespace, KvLayout layout, ReadOnlySpan<int> tokens, Span<BlockHash> destination, ReadOnlySpan<byte> extraKeys = default)
    {
        BlockHash root = Root(tenantNamespace, layout);
        return ComputeChain(root, layout.TokensPerBlock, tokens, destination, extraKeys);
    }

    // One hash per full block; a trailing partial block is never hashed, so it can never be shared.
    // extraKeys (e.g. a LoRA adapter id or cache salt) are bound into every block of the chain.
    [SkipLocalsInit]
    public static int ComputeChain(
        BlockHash root, int tokensPerBlock, ReadOnlySpan<int> tokens, Span<BlockHash> destination, ReadOnlySpan<byte> extraKeys = default)
    {
        if (tokensPerBlock < 1 || tokensPerBlock > KvLayout.MaxTokensPerBlock)
        {
            ThrowHelper.TokensPerBlock(tokensPerBlock);
        }

        int blocks = tokens.Length / tokensPerBlock;
        if (destination.Length < blocks)
        {
            ThrowHelper.DestinationTooSmall(destination.Length, blocks, tokens.Length, tokensPerBlock);
        }

        // Validate everything before writing anything, so a bad token never leaves a half-filled destination.
        ThrowIfAnyNegative(tokens);
        if (blocks == 0)
        {
            return 0;
        }

        int length = BlockMessageLength(tokensPerBlock, extraKeys.Length);
        byte[]? rented = null;
        Span<byte> buffer = length <= StackBufferBytes
            ? stackalloc byte[StackBufferBytes]
            : (rented = ArrayPool<byte>.Shared.Rent(length));
        try
        {
            Span<byte> message = buffer[..length];
            BlockHash hash = root;
            for (int i = 0; i < blocks; i++)
            {
                hash = HashBlock(hash, tokens.Slice(i * tokensPerBlock, tokensPerBlock), extraKeys, message);
                destination[i] = hash;
            }

            return blocks;
        }
        finally
        {
            ReturnScrubbed(rented);
        }
    }

    private static BlockHash HashBlock(BlockHash parent, ReadOnlySpan<int> tokens, ReadOnlySpan<byte> extraKeys, Span<byte> message)
    {
        var writer = new SpecWriter(message);
        writer.Raw(BlockTag);
        parent.WriteTo(writer.Take(BlockHash.Size));
        writer.U32((uint)tokens.Length);
        writer.Tokens(tokens);
        writer.U32((uint)extraKeys.Length);
        writer.Raw(extraKeys);
        Debug.Assert(writer.Position == message.Length, "block message sized wrongly");
        return Digest(message);
    }

    [SkipLocalsInit]
    private static BlockHash Digest(ReadOnlySpan<byte> message)
    {
        Span<byte> digest = stackalloc byte[SHA256.HashSizeInBytes];
        SHA256.HashData(message, digest);
        return BlockHash.FromDigest(digest);
    }

    private static int BlockMessageLength(int tokenCount, int extraBytes)
    {
        long length = BlockFixedBytes + (4L * tokenCount) + extraBytes;
        if (length > Array.MaxLength)
        {
            ThrowHelper.BlockTooLarge(tokenCount, extraBytes);
        }

        return (int)length;
    }

    private static void ThrowIfAnyNegative(ReadOnlySpan<int> tokens)
    {
        int index = tokens.IndexOfAnyInRange(int.MinValue, -1);
        if (index >= 0)
        {
            ThrowHelper.NegativeToken(index, tokens[index]);
        }
    }

    // Token ids are tenant prompt data; do not leave them behind in a shared pool.
    private static void ReturnScrubbed(byte[]? rented)
    {
        if (rented is not null)
        {
            ArrayPool<byte>.Shared.Return(rented, clearArray: true);
        }
    }

    // Throws out of line so the hot paths above stay small.
    private static class ThrowHelper
    {
        [DoesNotReturn]
        public static void EmptyBlock() =>
            throw new ArgumentException("A block needs at least one token; got none.", "tokens");

        [DoesNotReturn]
        public static void NegativeToken(int index, int value) =>
            throw new ArgumentException($"Token ids must be non-negative; tokens[{index}] is {value}.", "tokens");

        [DoesNotReturn]
        public static void TokensPerBlock(int value) =>
            throw new ArgumentOutOfRangeException(
                "tokensPerBlock", value, $"tokensPerBlock is {value}; allowed: 1 to {KvLayout.MaxTokensPerBlock}.");

        [DoesNotReturn]
        public static void DestinationTooSmall(int room, int needed, int tokens, int tokensPerBlock) =>
            throw new ArgumentException(
                $"destination has room for {room} hashes, but {tokens} tokens make {needed} full blocks of {tokensPerBlock}; " +
                $"it needs at least {needed}.",
                "destination");

        [DoesNotReturn]
        public static void BlockTooLarge(int tokens, int extraBytes) =>
            throw new ArgumentException($"A block of {tokens} tokens with {extraBytes} extra key bytes is too large to hash.", "tokens");
    }
}
