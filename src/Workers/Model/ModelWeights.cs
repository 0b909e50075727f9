using System.Runtime.CompilerServices;

namespace KvFabric.Workers.Model;

// Counter-based, platform-independent weight generator: element i of tensor t is a pure function of (seed, t, i),
// made only of integer arithmetic and one exactly rounded float conversion and multiply. No libm, no sequence state,
// so weights are the same on every machine and can be generated in any order or in parallel.
internal static class WeightRng
{
    private const float Sqrt3Over32767 = 1.7320508f / 32767.5f;

    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static ulong Mix(ulong z)
    {
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    public static ulong Stream(ulong seed, ulong tensor) => Mix(Mix(seed) ^ Mix(tensor * 0xD1B54A32D192ED03UL));

    // Approximately N(0, 1): the sum of four 16-bit uniforms (Irwin-Hall), centred and scaled to unit variance.
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    public static float Normal(ulong stream, ulong index)
    {
        ulong h = Mix(stream ^ (index * 0x9E3779B97F4A7C15UL));
        int sum = (int)(h & 0xFFFF) + (int)((h >> 16) & 0xFFFF) + (int)((h >> 32) & 0xFFFF) + (int)(h >> 48);
        return ((sum - (2 * 65535)) * 0.5f) * Sqrt3Over32767;
    }

    /// <summary>Uniform in [0, 1) with 24 bits.</summary>
    public static float Uniform(ulong stream, ulong index) => (Mix(stream ^ (index * 0x9E3779B97F4A7C15UL)) >> 40) * (1f / 16777216f);

    public static float[] Tensor(ulong seed, ulong tensorId, int count, float std)
    {
        float[] data = GC.AllocateUninitializedArray<float>(count, pinned: true);
        ulong stream = Stream(seed, tensorId);
        for (int i = 0; i < count; i++)
        {
            data[i] = Normal(stream, (ulong)i) * std;
        }

        return data;
    }

    public static float[] Ones(int count)
    {
        float[] data = GC.AllocateUninitializedArray<float>(count, pinned: true);
        Array.Fill(data, 1f);
        return data;
    }
}

internal sealed class LayerWeights
{
    public required float[] AttnNorm { get; init; }
    public required float[] Wq { get; init; }   // QDim x DModel
    public required float[] Wk { get; init; }   // KvDim x DModel
    public required float[] Wv { get; init; }   // KvDim x DModel
    public required float[] Wo { get; init; }   // DModel x QDim
    public required float[] MlpNorm { get; init; }
    public required float[] WGate { get; init; } // Ffn x DModel
    public required float[] WUp { get; init; }   // Ffn x DModel
    public required float[] WDown { get; init; } // DModel x Ffn
}

// All weights live in pinned arrays so kernels can hold raw pointers to them.
internal sealed class ModelWeights
{
    public ModelWeights(ModelConfig c)
    {
        ulong seed = c.Seed;
        float inD = 1f / MathF.Sqrt(c.DModel);
        Embedding = WeightRng.Tensor(seed, 1, checked(c.Vocab * c.DModel), 1f);
        LmHead = c.TiedEmbeddings ? null : WeightRng.Tensor(seed, 2, checked(c.Vocab * c.DModel), inD);
        FinalNorm = WeightRng.Ones(c.DModel);
        Layers = new LayerWeights[c.Layers];
        for (int l = 0; l < c.Layers; l++)
        {
            ulong t = 16 + ((ulong)l * 16);
            Layers[l] = new LayerWeights
            {
                AttnNorm = WeightRng.Ones(c.DModel),
                Wq = WeightRng.Tensor(seed, t + 0, checked(c.QDim * c.DModel), inD),
                Wk = WeightRng.Tensor(seed, t + 1, checked(c.KvDim * c.DModel), inD),
                Wv = WeightRng.Tensor(seed, t + 2, checked(c.KvDim * c.DModel), inD),
                Wo = WeightRng.Tensor(seed, t + 3, checked(c.DModel * c.QDim), 1f / MathF.Sqrt(c.QDim)),
                MlpNorm = WeightRng.Ones(c.DModel),
                WGate = WeightRng.Tensor(seed, t + 4, checked(c.Ffn * c.DModel), inD),
                WUp = WeightRng.Tensor(seed, t + 5, checked(c.Ffn * c.DModel), inD),
                WDown = WeightRng.Tensor(seed, t + 6, checked(c.DModel * c.Ffn), 1f / MathF.Sqrt(c.Ffn)),
            };
        }
    }

    public float[] Embedding { get; }   // Vocab x DModel, N(0, 1)
    public float[]? LmHead { get; }     // Vocab x DModel, or null when tied
    public float[] FinalNorm { get; }
    public LayerWeights[] Layers { get; }
}
