using System.Globalization;
using KvFabric.Blocks;

namespace KvFabric.Workers.Model;

/// <summary>
/// Shape and seed of the small decoder-only transformer. The weights are a pure function of this record, so two
/// processes with equal configs compute bit-identical KV and logits.
/// </summary>
public sealed record ModelConfig
{
    public int Vocab { get; init; } = 4096;
    public int DModel { get; init; } = 256;
    public int Layers { get; init; } = 4;
    public int Heads { get; init; } = 8;
    public int KvHeads { get; init; } = 2;
    public int HeadDim { get; init; } = 32;
    public int Ffn { get; init; } = 768;
    public float RopeTheta { get; init; } = 10000f;
    public ulong Seed { get; init; } = 1;
    public int TokensPerBlock { get; init; } = 16;

    /// <summary>
    /// LM head shares the token embedding (scaled by 1/sqrt(DModel)) instead of having its own matrix. Off by default:
    /// with random weights a tied head mostly predicts the input token again, so greedy decoding repeats one token.
    /// </summary>
    public bool TiedEmbeddings { get; init; }

    public float NormEpsilon { get; init; } = 1e-5f;

    /// <summary>Longest sequence (prompt + generated); sizes the RoPE tables and the attention scratch.</summary>
    public int MaxPositions { get; init; } = 8192;

    /// <summary>Rows (tokens) processed per forward chunk; bounds activation scratch. Results do not depend on it.</summary>
    public int ChunkTokens { get; init; } = 256;

    public static ModelConfig Default { get; } = new();

    /// <summary>A tiny shape for unit tests: fast to build and run.</summary>
    public static ModelConfig Tiny { get; } = new()
    {
        Vocab = 97, DModel = 32, Layers = 2, Heads = 4, KvHeads = 2, HeadDim = 8, Ffn = 48, TokensPerBlock = 4, MaxPositions = 512,
        ChunkTokens = 16, TiedEmbeddings = true,
    };

    public int GroupSize => Heads / KvHeads;
    public int QDim => Heads * HeadDim;
    public int KvDim => KvHeads * HeadDim;

    public void Validate()
    {
        Positive(Vocab, nameof(Vocab));
        Positive(DModel, nameof(DModel));
        Positive(Layers, nameof(Layers));
        Positive(Heads, nameof(Heads));
        Positive(KvHeads, nameof(KvHeads));
        Positive(HeadDim, nameof(HeadDim));
        Positive(Ffn, nameof(Ffn));
        Positive(TokensPerBlock, nameof(TokensPerBlock));
        Positive(MaxPositions, nameof(MaxPositions));
        Positive(ChunkTokens, nameof(ChunkTokens));
        if (Heads % KvHeads != 0)
        {
            throw new ArgumentException($"ModelConfig.Heads ({Heads}) must be a multiple of KvHeads ({KvHeads}).");
        }

        if (HeadDim % 2 != 0)
        {
            throw new ArgumentException($"ModelConfig.HeadDim ({HeadDim}) must be even for rotary embeddings.");
        }

        if (!(RopeTheta > 1f) || float.IsInfinity(RopeTheta))
        {
            throw new ArgumentException($"ModelConfig.RopeTheta ({RopeTheta}) must be a finite number above 1.");
        }

        if (!(NormEpsilon > 0f) || float.IsInfinity(NormEpsilon))
        {
            throw new ArgumentException($"ModelConfig.NormEpsilon ({NormEpsilon}) must be a finite positive number.");
        }
    }

    /// <summary>
    /// The model fingerprint that goes into <see cref="KvLayout"/> (and so into every block hash root): every field
    /// that changes the KV bytes, including the seed. TokensPerBlock, MaxPositions and ChunkTokens do not change the
    /// KV values, so they are not part of it (the block size is a field of the layout itself).
    /// </summary>
    public string Fingerprint() => string.Create(
        CultureInfo.InvariantCulture,
        $"kvfabric-tiny-llama/v1 vocab={Vocab} d={DModel} layers={Layers} heads={Heads} kv={KvHeads} hd={HeadDim} " +
        $"ffn={Ffn} theta={BitConverter.SingleToInt32Bits(RopeTheta):x8} eps={BitConverter.SingleToInt32Bits(NormEpsilon):x8} " +
        $"tied={(TiedEmbeddings ? 1 : 0)} seed={Seed:x16}");

    /// <summary>The fabric layout of this model's KV blocks: F32, so blocks round-trip without precision loss.</summary>
    public KvLayout ToKvLayout() => new(Fingerprint(), Layers, KvHeads, HeadDim, KvDType.F32, TokensPerBlock);

    private static void Positive(int value, string name)
    {
        if (value <= 0)
        {
            throw new ArgumentException($"ModelConfig.{name} is {value}; it must be positive.");
        }
    }
}
