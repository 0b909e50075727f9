using KvFabric.Blocks;
using Xunit;

namespace KvFabric.Tests.Blocks;

public sealed class BlockHasherTests
{
    private static readonly KvLayout Layout = SpecVectors.LayoutA;

    private static BlockHash[] Chain(string tenant, KvLayout layout, int[] tokens, ReadOnlySpan<byte> extraKeys = default)
    {
        var hashes = new BlockHash[tokens.Length / layout.TokensPerBlock];
        Assert.Equal(hashes.Length, BlockHasher.ComputeChain(tenant, layout, tokens, hashes, extraKeys));
        return hashes;
    }

    [Fact]
    public void TenantsNeverShareAHashForTheSameTokens()
    {
        int[] tokens = SpecVectors.Tokens(64);
        BlockHash[] a = Chain("a", Layout, tokens);
        BlockHash[] b = Chain("b", Layout, tokens);

        Assert.NotEqual(BlockHasher.Root("a", Layout), BlockHasher.Root("b", Layout));
        Assert.Empty(a.Intersect(b));
    }

    public static TheoryData<string, KvLayout> OneFieldChanged => new()
    {
        { "ModelFingerprint", new("tiny-llama@seed-2", 4, 2, 64, KvDType.F16, 16) },
        { "Layers", new("tiny-llama@seed-1", 5, 2, 64, KvDType.F16, 16) },
        { "KvHeads", new("tiny-llama@seed-1", 4, 4, 64, KvDType.F16, 16) },
        { "HeadDim", new("tiny-llama@seed-1", 4, 2, 128, KvDType.F16, 16) },
        { "DType", new("tiny-llama@seed-1", 4, 2, 64, KvDType.BF16, 16) },
        { "TokensPerBlock", new("tiny-llama@seed-1", 4, 2, 64, KvDType.F16, 32) },
        { "TensorParallelSize", new("tiny-llama@seed-1", 4, 2, 64, KvDType.F16, 16, tensorParallelSize: 2) },
        { "TensorParallelRank", new("tiny-llama@seed-1", 4, 2, 64, KvDType.F16, 16, tensorParallelSize: 2, tensorParallelRank: 1) },
    };

    [Theory]
    [MemberData(nameof(OneFieldChanged))]
    public void AnyLayoutFieldChangesTheRootAndTheFingerprint(string field, KvLayout changed)
    {
        Assert.NotEqual(Layout, changed);
        Assert.True(BlockHasher.Root("dev", Layout) != BlockHasher.Root("dev", changed), $"changing {field} kept the root");
        Assert.True(Layout.Fingerprint != changed.Fingerprint, $"changing {field} kept the fingerprint");
    }

    [Fact]
    public void TpRanksOfOneModelHaveDistinctRoots()
    {
        var rank0 = new KvLayout("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 2, tensorParallelRank: 0);
        var rank1 = new KvLayout("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 2, tensorParallelRank: 1);
        Assert.NotEqual(BlockHasher.Root("dev", rank0), BlockHasher.Root("dev", rank1));
    }

    [Fact]
    public void ExtraKeysChangeTheBlockHash()
    {
        BlockHash root = BlockHasher.Root("dev", Layout);
        int[] block = SpecVectors.Tokens(16);

        BlockHash plain = BlockHasher.Next(root, block);
        BlockHash lora7 = BlockHasher.Next(root, block, "lora:7"u8);
        BlockHash lora8 = BlockHasher.Next(root, block, "lora:8"u8);

        Assert.NotEqual(plain, lora7);
        Assert.NotEqual(lora7, lora8);
        Assert.Equal(plain, BlockHasher.Next(root, block, ReadOnlySpan<byte>.Empty));
        Assert.Equal(lora7, BlockHasher.Next(root, block, "lora:7"u8));
    }

    [Fact]
    public void ExtraKeysInComputeChainBindEveryBlock()
    {
        int[] tokens = SpecVectors.Tokens(48);
        BlockHash[] plain = Chain("dev", Layout, tokens);
        BlockHash[] salted = Chain("dev", Layout, tokens, "salt"u8);

        Assert.Empty(plain.Intersect(salted));
        BlockHash first = BlockHasher.Next(BlockHasher.Root("dev", Layout), tokens.AsSpan(0, 16), "salt"u8);
        Assert.Equal(first, salted[0]);
    }

    [Fact]
    public void ChangingAnEarlyTokenChangesThatBlockAndAllLaterOnesOnly()
    {
        int[] tokens = SpecVectors.Tokens(5 * 16);
        BlockHash[] before = Chain("dev", Layout, tokens);
        tokens[(2 * 16) + 3]++;
        BlockHash[] after = Chain("dev", Layout, tokens);

        Assert.Equal(before[..2], after[..2]);
        for (int i = 2; i < before.Length; i++)
        {
            Assert.NotEqual(before[i], after[i]);
        }
    }

    [Fact]
    public void ParentIsBoundIntoTheBlock()
    {
        int[] block = SpecVectors.Tokens(16);
        Assert.NotEqual(
            BlockHasher.Next(new BlockHash(0, 1), block),
            BlockHasher.Next(new BlockHash(0, 2), block));
    }

    [Fact]
    public void ATrailingPartialBlockIsNeverHashed()
    {
        int[] full = SpecVectors.Tokens(32);
        int[] withTail = SpecVectors.Tokens(32 + 15);
        var hashes = new BlockHash[3];

        Assert.Equal(2, BlockHasher.ComputeChain("dev", Layout, withTail, hashes));
        Assert.Equal(Chain("dev", Layout, full), hashes[..2]);
        Assert.Equal(default, hashes[2]);
        Assert.Equal(0, BlockHasher.ComputeChain("dev", Layout, SpecVectors.Tokens(15), Span<BlockHash>.Empty));
    }

    [Fact]
    public void PrecomputedRootOverloadMatches()
    {
        int[] tokens = SpecVectors.Tokens(40);
        var viaRoot = new BlockHash[2];
        Assert.Equal(2, BlockHasher.ComputeChain(BlockHasher.Root("dev", Layout), 16, tokens, viaRoot));
        Assert.Equal(Chain("dev", Layout, tokens), viaRoot);
    }

    [Fact]
    public void DestinationTooSmallSaysHowManyAreNeeded()
    {
        var hashes = new BlockHash[2];
        var e = Assert.Throws<ArgumentException>(() => BlockHasher.ComputeChain("dev", Layout, SpecVectors.Tokens(50), hashes));
        Assert.Equal("destination", e.ParamName);
        Assert.Contains("needs at least 3", e.Message, StringComparison.Ordinal);
        Assert.Equal(new BlockHash[2], hashes);
    }

    [Fact]
    public void NegativeTokensAreRejectedBeforeAnythingIsWritten()
    {
        int[] tokens = SpecVectors.Tokens(48);
        tokens[40] = -5;
        var hashes = new BlockHash[3];

        var e = Assert.Throws<ArgumentException>(() => BlockHasher.ComputeChain("dev", Layout, tokens, hashes));
        Assert.Contains("tokens[40] is -5", e.Message, StringComparison.Ordinal);
        Assert.Equal(new BlockHash[3], hashes);

        e = Assert.Throws<ArgumentException>(() => BlockHasher.Next(default, [1, 2, int.MinValue]));
        Assert.Contains("tokens[2]", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void EmptyBlockIsRejected()
    {
        var e = Assert.Throws<ArgumentException>(() => BlockHasher.Next(default, ReadOnlySpan<int>.Empty));
        Assert.Equal("tokens", e.ParamName);
    }

    [Theory]
    [InlineData(0)]
    [InlineData(-16)]
    public void NonPositiveTokensPerBlockIsRejected(int tokensPerBlock)
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => BlockHasher.ComputeChain(default, tokensPerBlock, new int[16], new BlockHash[16]));
        Assert.Equal("tokensPerBlock", e.ParamName);
    }

    [Fact]
    public void NamespaceIsValidated()
    {
        Assert.Throws<ArgumentNullException>(() => BlockHasher.Root(null!, Layout));
        Assert.Contains("is empty", Assert.Throws<ArgumentException>(() => BlockHasher.Root("", Layout)).Message, StringComparison.Ordinal);
        Assert.Contains("257 UTF-8 bytes", Assert.Throws<ArgumentException>(() => BlockHasher.Root(new string('n', 257), Layout)).Message, StringComparison.Ordinal);
        Assert.Contains("unpaired surrogate", Assert.Throws<ArgumentException>(() => BlockHasher.Root("bad\ud800", Layout)).Message, StringComparison.Ordinal);

        // 128 two-byte characters are exactly the 256-byte limit.
        _ = BlockHasher.Root(new string('\u00e9', 128), Layout);
        Assert.Throws<ArgumentException>(() => BlockHasher.Root(new string('\u00e9', 129), Layout));
    }

    [Fact]
    public void StackAndPooledPathsAgreeAcrossTheThreshold()
    {
        // Around 4 KiB of message the hasher switches from the stack buffer to a pooled array.
        BlockHash root = BlockHasher.Root("dev", Layout);
        foreach (int count in new[] { 1, 1000, 1013, 1014, 1015, 4096 })
        {
            int[] tokens = SpecVectors.Tokens(count);
            var chain = new BlockHash[1];
            Assert.Equal(1, BlockHasher.ComputeChain(root, count, tokens, chain));
            Assert.Equal(BlockHasher.Next(root, tokens), chain[0]);
        }
    }

    [Fact]
    public void HashingAllocatesNothing()
    {
        int[] small = SpecVectors.Tokens(16 * 8);
        int[] large = SpecVectors.Tokens(4096);
        var hashes = new BlockHash[8];
        BlockHash root = BlockHasher.Root("dev", Layout);

        // Warm up JIT and the pool first.
        BlockHasher.ComputeChain(root, 16, small, hashes);
        BlockHasher.ComputeChain(root, 4096, large, hashes);
        BlockHasher.Next(root, small.AsSpan(0, 16));
        BlockHasher.Root("dev", Layout);

        long before = GC.GetAllocatedBytesForCurrentThread();
        BlockHasher.ComputeChain(root, 16, small, hashes);
        BlockHasher.ComputeChain(root, 4096, large, hashes);
        BlockHasher.Next(root, small.AsSpan(0, 16));
        BlockHasher.Root("dev", Layout);
        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }
}
