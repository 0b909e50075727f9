namespace KvFabric.Blocks;

// The shape of one KV-cache block as held by one tensor-parallel rank. Blocks are only interchangeable between
// processes whose layouts are equal, which is why the whole layout (not just the model name) seeds every hash chain.
//
// Byte layout of one block, layer-major: [layer][kv: 0=K, 1=V][token][head][dim], elements of DType, no padding.
// One layer's K (or V) for all tokens of the block is therefore one contiguous slab of LayerKvBytes, which is what
// an attention kernel or a per-layer streaming transfer wants to read in one go.
public sealed partial record KvLayout
{
    public const int MaxModelFingerprintBytes = 256;
    public const int MaxLayers = 1024;
    public const int MaxKvHeads = 1024;
    public const int MaxHeadDim = 4096;
    public const int MaxTokensPerBlock = 65536;
    public const int MaxTensorParallelSize = 1024;

    // One block must fit one array / Span<byte> and one transfer buffer.
    public const long MaxBlockBytes = int.MaxValue;

    public KvLayout(
        string modelFingerprint,
        int layers,
        int kvHeads,
        int headDim,
        KvDType dType,
        int tokensPerBlock,
        int tensorParallelSize = 1,
        int tensorParallelRank = 0)
    {
        SpecEncoding.Utf8Length(modelFingerprint, nameof(modelFingerprint), "KvLayout.ModelFingerprint", MaxModelFingerprintBytes);
        CheckRange(layers, 1, MaxLayers, nameof(layers), nameof(Layers));
        CheckRange(kvHeads, 1, MaxKvHeads, nameof(kvHeads), nameof(KvHeads));
        CheckRange(headDim, 1, MaxHeadDim, nameof(headDim), nameof(HeadDim));
        if (!dType.IsKnown())
        {
            throw new ArgumentException(
                $"KvLayout.DType is {(byte)dType}, which is not a known KvDType; allowed: F32=1, F16=2, BF16=3, Fp8E4M3=4, Fp8E5M2=5.",
                nameof(dType));
        }

        CheckRange(tokensPerBlock, 1, MaxTokensPerBlock, nameof(tokensPerBlock), nameof(TokensPerBlock));
        CheckRange(tensorParallelSize, 1, MaxTensorParallelSize, nameof(tensorParallelSize), nameof(TensorParallelSize));
        if (kvHeads % tensorParallelSize != 0)
        {
            throw new ArgumentException(
                $"KvLayout.KvHeads ({kvHeads}) must be divisible by KvLayout.TensorParallelSize ({tensorParallelSize}) " +
                "so that every rank holds the same number of heads.",
                nameof(tensorParallelSize));
        }

        if (tensorParallelRank < 0 || tensorParallelRank >= tensorParallelSize)
        {
            throw new ArgumentException(
                $"KvLayout.TensorParallelRank is {tensorParallelRank}; allowed: 0 to {tensorParallelSize - 1} (TensorParallelSize {tensorParallelSize}).",
                nameof(tensorParallelRank));
        }

        // All factors are bounded above, so this product cannot overflow a long (< 2^56).
        long blockBytes = (long)layers * 2 * tokensPerBlock * (kvHeads / tensorParallelSize) * headDim * dType.SizeInBytes();
        if (blockBytes > MaxBlockBytes)
        {
            throw new ArgumentException(
                $"KvLayout.BlockBytes would be {blockBytes} bytes; at most {MaxBlockBytes} are allowed. " +
                "Use fewer TokensPerBlock (or more tensor-parallel ranks).",
                nameof(tokensPerBlock));
        }

        ModelFingerprint = modelFingerprint;
        Layers = layers;
        KvHeads = kvHeads;
        HeadDim = headDim;
        DType = dType;
        TokensPerBlock = tokensPerBlock;
        TensorParallelSize = tensorParallelSize;
        TensorParallelRank = tensorParallelRank;
        Fingerprint = ComputeFingerprint();
    }

    public string ModelFingerprint { get; }

    public int Layers { get; }

    // Total KV heads of the model, across all tensor-parallel ranks.
    public int KvHeads { get; }

    public int HeadDim { get; }

    public KvDType DType { get; }

    public int TokensPerBlock { get; }

    public int TensorParallelSize { get; }

    public int TensorParallelRank { get; }

    // Computed once at construction: layouts are compared by fingerprint on every connect.
    public BlockHash Fingerprint { get; }

    public int HeadsPerRank => KvHeads / TensorParallelSize;

    public long LayerKvBytes => (long)TokensPerBlock * HeadsPerRank * HeadDim * DType.SizeInBytes();

    public long BlockBytes => 2 * Layers * LayerKvBytes;

    // Byte offset of element [layer][kv][token][head][0] within a block; head is rank-local (0 to HeadsPerRank - 1).
    public long Offset(int layer, int kv, int token, int head)
    {
        CheckIndex(layer, Layers, nameof(layer));
        CheckIndex(kv, 2, nameof(kv));
        CheckIndex(token, TokensPerBlock, nameof(token));
        CheckIndex(head, HeadsPerRank, nameof(head));
        long headBytes = (long)HeadDim * DType.SizeInBytes();
        return ((((long)layer * 2 + kv) * TokensPerBlock + token) * HeadsPerRank + head) * headBytes;
    }

    public string Describe() =>
        $"{ModelFingerprint}: {Layers} layers x {KvHeads} KV heads x {HeadDim} dim {DType}, " +
        $"{TokensPerBlock} tokens/block, TP rank {TensorParallelRank}/{TensorParallelSize} ({HeadsPerRank} heads/rank), " +
        $"{FormatBytes(BlockBytes)}/block, fingerprint {Fingerprint}";

    private static void CheckRange(int value, int min, int max, string paramName, string field)
    {
        if (value < min || value > max)
        {
            throw new ArgumentException($"KvLayout.{field} is {value}; allowed: {min} to {max}.", paramName);
        }
    }

    private static void CheckIndex(int value, int count, string paramName)
    {
        if ((uint)value >= (uint)count)
        {
            throw new ArgumentOutOfRangeException(paramName, value, $"{paramName} must be in 0 to {count - 1} for this layout.");
        }
    }

    private static string FormatBytes(long bytes) => bytes switch
    {
        >= 1L << 30 => $"{bytes / (double)(1L << 30):0.##} GiB",
        >= 1L << 20 => $"{bytes / (double)(1L << 20):0.##} MiB",
        >= 1L << 10 => $"{bytes / (double)(1L << 10):0.##} KiB",
        _ => $"{bytes} B",
    };
}
