using KvFabric.Blocks;

namespace KvFabric.Tests.Blocks;

// The inputs of the spec v1 test vectors, shared by the pinned-hex tests and the Python cross-check.
// hash_spec_v1.py and docs/hashing.md spell out the same inputs; change all three together.
internal static class SpecVectors
{
    public static readonly KvLayout LayoutA = new("tiny-llama@seed-1", layers: 4, kvHeads: 2, headDim: 64, KvDType.F16, tokensPerBlock: 16);

    public static readonly KvLayout LayoutB =
        new("llama-3-70b@sha256:0123abcd", layers: 80, kvHeads: 8, headDim: 128, KvDType.BF16, tokensPerBlock: 32, tensorParallelSize: 4, tensorParallelRank: 3);

    // Blocks of 2048 tokens (8 KiB of token bytes) take the pooled-buffer path rather than the stack buffer.
    public static readonly KvLayout LayoutC = new("tiny-llama@seed-1", layers: 4, kvHeads: 2, headDim: 64, KvDType.F16, tokensPerBlock: 2048);

    public const string UnicodeNamespace = "tenant-\u00e9\u4e2d";

    public static ReadOnlySpan<byte> LoraExtraKeys => "lora:adapter-7"u8;

    public static int[] Tokens(int count)
    {
        var tokens = new int[count];
        for (int i = 0; i < count; i++)
        {
            tokens[i] = (int)(((long)i * 7919 + 13) % 128256);
        }

        return tokens;
    }

    // Every vector as lowercase hex, keyed as hash_spec_v1.py keys them.
    public static Dictionary<string, object> Compute()
    {
        int[] tokens = Tokens(53);
        BlockHash rootA = BlockHasher.Root("dev", LayoutA);
        return new Dictionary<string, object>
        {
            ["layout_a_canonical"] = Convert.ToHexStringLower(LayoutA.ToCanonicalBytes()),
            ["layout_a_fingerprint"] = LayoutA.Fingerprint.ToString(),
            ["root_dev_a"] = rootA.ToString(),
            ["chain_dev_a"] = Chain("dev", LayoutA, tokens),
            ["block_extra_keys"] = BlockHasher.Next(rootA, tokens.AsSpan(0, 16), LoraExtraKeys).ToString(),
            ["layout_b_fingerprint"] = LayoutB.Fingerprint.ToString(),
            ["root_tenant_utf8_b"] = BlockHasher.Root(UnicodeNamespace, LayoutB).ToString(),
            ["chain_dev_c_large_blocks"] = Chain("dev", LayoutC, Tokens(4096 + 7)),
        };
    }

    private static string[] Chain(string tenant, KvLayout layout, int[] tokens)
    {
        var hashes = new BlockHash[tokens.Length / layout.TokensPerBlock];
        int count = BlockHasher.ComputeChain(tenant, layout, tokens, hashes);
        return hashes.AsSpan(0, count).ToArray().Select(h => h.ToString()).ToArray();
    }
}
