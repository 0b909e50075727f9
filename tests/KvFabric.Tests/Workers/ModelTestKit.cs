using System.Runtime.InteropServices;
using KvFabric.Memory;
using KvFabric.Workers.Model;
using Xunit;

namespace KvFabric.Tests.Workers;

// Small configs and helpers shared by the model tests.
internal static class ModelTestKit
{
    public static ModelConfig Tiny => ModelConfig.Tiny;

    // Dimensions that are not multiples of 8, so every kernel's scalar tail runs; one KV head for 3 query heads.
    public static ModelConfig Odd => new()
    {
        Vocab = 61, DModel = 36, Layers = 2, Heads = 3, KvHeads = 1, HeadDim = 10, Ffn = 52, TokensPerBlock = 5,
        MaxPositions = 256, ChunkTokens = 7, Seed = 7, TiedEmbeddings = false,
    };

    // A head dimension of 42 runs attention's 32-wide, 8-wide and scalar paths; three tokens per block.
    public static ModelConfig Wide => new()
    {
        Vocab = 50, DModel = 40, Layers = 1, Heads = 2, KvHeads = 1, HeadDim = 42, Ffn = 24, TokensPerBlock = 3,
        MaxPositions = 128, ChunkTokens = 5, Seed = 11,
    };

    public static TheoryData<string> ConfigNames => new() { "tiny", "odd", "wide" };

    public static ModelConfig ByName(string name) => name switch
    {
        "tiny" => Tiny,
        "odd" => Odd,
        "wide" => Wide,
        _ => throw new ArgumentException(name, nameof(name)),
    };

    public static int[] Tokens(int count, int vocab, int salt = 0)
    {
        var tokens = new int[count];
        for (int i = 0; i < count; i++)
        {
            tokens[i] = (int)((((uint)i * 2654435761u) + ((uint)salt * 40503u) + 12345u) % (uint)vocab);
        }

        return tokens;
    }

    public static HostBlockPool Pool(Transformer model, int blocks = 256) => model.CreatePool(blocks);

    // The full blocks' bytes, concatenated.
    public static byte[] FullBlockBytes(KvCache cache)
    {
        int blockBytes = checked((int)cache.Layout.BlockBytes);
        var bytes = new byte[cache.FullBlocks * blockBytes];
        for (int i = 0; i < cache.FullBlocks; i++)
        {
            cache.ExportBlock(i, bytes.AsSpan(i * blockBytes, blockBytes));
        }

        return bytes;
    }

    // One element vector ([layer][kv][position][head][0..HeadDim)) read through KvLayout.Offset from an exported block.
    public static float[] Element(KvCache cache, int layer, int kv, int position, int head)
    {
        var block = new byte[cache.Layout.BlockBytes];
        cache.ExportBlock(position / cache.TokensPerBlock, block);
        long offset = cache.Layout.Offset(layer, kv, position % cache.TokensPerBlock, head);
        return MemoryMarshal.Cast<byte, float>(block.AsSpan((int)offset, cache.Layout.HeadDim * sizeof(float))).ToArray();
    }

    public static void BitEqual(ReadOnlySpan<float> expected, ReadOnlySpan<float> actual)
    {
        Assert.Equal(expected.Length, actual.Length);
        Assert.True(
            MemoryMarshal.AsBytes(expected).SequenceEqual(MemoryMarshal.AsBytes(actual)),
            $"float arrays differ first at {FirstDiff(expected, actual)}");
    }

    private static int FirstDiff(ReadOnlySpan<float> a, ReadOnlySpan<float> b)
    {
        for (int i = 0; i < a.Length; i++)
        {
            if (BitConverter.SingleToInt32Bits(a[i]) != BitConverter.SingleToInt32Bits(b[i]))
            {
                return i;
            }
        }

        return -1;
    }
}
