using KvFabric.Blocks;
using Xunit;

namespace KvFabric.Tests.Blocks;

// Spec v1 pinned: these exact values are in docs/hashing.md. If one changes, the spec changed, and the spec
// version must be bumped (new "/v2" tags) rather than these values edited.
public sealed class BlockHasherVectorTests
{
    [Fact]
    public void LayoutACanonicalEncoding() => Assert.Equal(
        "6b766661627269632e6c61796f7574011100000074696e792d6c6c616d6140736565642d31" +
        "04000000020000004000000002100000000100000000000000",
        Convert.ToHexStringLower(SpecVectors.LayoutA.ToCanonicalBytes()));

    [Fact]
    public void LayoutAFingerprint() =>
        Assert.Equal("f0594b3da644104e2482379a1c14f8e1", SpecVectors.LayoutA.Fingerprint.ToString());

    [Fact]
    public void RootForDevAndLayoutA() =>
        Assert.Equal("c6c513646c6e1bf3fd84f5198211b2fc", BlockHasher.Root("dev", SpecVectors.LayoutA).ToString());

    [Fact]
    public void FirstThreeChainHashes()
    {
        var hashes = new BlockHash[4];
        int count = BlockHasher.ComputeChain("dev", SpecVectors.LayoutA, SpecVectors.Tokens(53), hashes);

        Assert.Equal(3, count);
        Assert.Equal("c21e412a8efc0a2ee0b1371302423c05", hashes[0].ToString());
        Assert.Equal("5a119f0dd5bc32c802b5797582397a0c", hashes[1].ToString());
        Assert.Equal("fe3774b6a4d3de641f3abb56d6153173", hashes[2].ToString());
        Assert.Equal(default, hashes[3]);
    }

    [Fact]
    public void BlockWithExtraKeys()
    {
        BlockHash root = BlockHasher.Root("dev", SpecVectors.LayoutA);
        BlockHash hash = BlockHasher.Next(root, SpecVectors.Tokens(16), SpecVectors.LoraExtraKeys);
        Assert.Equal("f088e2bb3fd211eeda6403efbab8ab3c", hash.ToString());
    }

    [Fact]
    public void TensorParallelLayoutAndUnicodeNamespace()
    {
        Assert.Equal("6f89a0990ac4f6a2a4e9c91195fffba5", SpecVectors.LayoutB.Fingerprint.ToString());
        Assert.Equal("922da1e306960cee6e02d8e7b26188c1", BlockHasher.Root(SpecVectors.UnicodeNamespace, SpecVectors.LayoutB).ToString());
    }

    [Fact]
    public void LargeBlocksThatUseThePooledBuffer()
    {
        var hashes = new BlockHash[2];
        Assert.Equal(2, BlockHasher.ComputeChain("dev", SpecVectors.LayoutC, SpecVectors.Tokens(4096 + 7), hashes));
        Assert.Equal("b5febb10555f383adb28eb0dc0bc2c33", hashes[0].ToString());
        Assert.Equal("4d5baa7e68789ddebff5e388e9ca2c2f", hashes[1].ToString());
    }

    [Fact]
    public void NextAgreesWithComputeChain()
    {
        int[] tokens = SpecVectors.Tokens(53);
        var chain = new BlockHash[3];
        BlockHasher.ComputeChain("dev", SpecVectors.LayoutA, tokens, chain);

        BlockHash hash = BlockHasher.Root("dev", SpecVectors.LayoutA);
        for (int i = 0; i < 3; i++)
        {
            hash = BlockHasher.Next(hash, tokens.AsSpan(i * 16, 16));
            Assert.Equal(chain[i], hash);
        }
    }
}
