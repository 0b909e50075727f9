using System.Security.Cryptography;

namespace KvFabric.Blocks;

// The canonical binary encoding of a layout (hashing spec v1, docs/hashing.md). It is fixed-width apart from the
// length-prefixed model fingerprint, so equal layouts always encode to equal bytes and vice versa.
public sealed partial record KvLayout
{
    private const byte EncodingVersion = 1;

    // Tag + version + str length + 6 x u32 + dtype.
    private const int FixedCanonicalBytes = 15 + 1 + 4 + (6 * 4) + 1;

    private static ReadOnlySpan<byte> CanonicalTag => "kvfabric.layout"u8;

    private static ReadOnlySpan<byte> FingerprintTag => "kvfabric.layout-fp/v1"u8;

    // Upper bound of CanonicalLength, so callers can stackalloc without asking.
    internal const int MaxCanonicalLength = FixedCanonicalBytes + MaxModelFingerprintBytes;

    public int CanonicalLength => FixedCanonicalBytes + ModelFingerprintUtf8Length;

    private int ModelFingerprintUtf8Length =>
        SpecEncoding.Utf8Length(ModelFingerprint, nameof(ModelFingerprint), "KvLayout.ModelFingerprint", MaxModelFingerprintBytes);

    // Writes exactly CanonicalLength bytes at the start of destination.
    public void WriteCanonical(Span<byte> destination)
    {
        int fingerprintBytes = ModelFingerprintUtf8Length;
        int length = FixedCanonicalBytes + fingerprintBytes;
        if (destination.Length < length)
        {
            throw new ArgumentException(
                $"The canonical layout encoding needs {length} bytes; destination has {destination.Length}.", nameof(destination));
        }

        var writer = new SpecWriter(destination);
        writer.Raw(CanonicalTag);
        writer.U8(EncodingVersion);
        writer.Str(ModelFingerprint, fingerprintBytes);
        writer.U32((uint)Layers);
        writer.U32((uint)KvHeads);
        writer.U32((uint)HeadDim);
        writer.U8((byte)DType);
        writer.U32((uint)TokensPerBlock);
        writer.U32((uint)TensorParallelSize);
        writer.U32((uint)TensorParallelRank);
    }

    public byte[] ToCanonicalBytes()
    {
        var bytes = new byte[CanonicalLength];
        WriteCanonical(bytes);
        return bytes;
    }

    // The whole input must be exactly one encoding; anything else is a FormatException saying what is wrong and where.
    public static KvLayout ReadCanonical(ReadOnlySpan<byte> encoded)
    {
        var reader = new SpecReader(encoded, "canonical KvLayout encoding");
        if (!reader.Take(CanonicalTag.Length, "tag").SequenceEqual(CanonicalTag))
        {
            throw reader.Fail("it does not start with the tag \"kvfabric.layout\"");
        }

        byte version = reader.U8("version");
        if (version != EncodingVersion)
        {
            throw reader.Fail($"version is {version}; this build reads version {EncodingVersion} only");
        }

        string modelFingerprint = reader.Str("model_fingerprint", MaxModelFingerprintBytes);
        int layers = reader.Int("layers");
        int kvHeads = reader.Int("kv_heads");
        int headDim = reader.Int("head_dim");
        var dType = (KvDType)reader.U8("dtype");
        int tokensPerBlock = reader.Int("tokens_per_block");
        int tpSize = reader.Int("tp_size");
        int tpRank = reader.Int("tp_rank");
        reader.End();
        try
        {
            return new KvLayout(modelFingerprint, layers, kvHeads, headDim, dType, tokensPerBlock, tpSize, tpRank);
        }
        catch (ArgumentException e)
        {
            throw reader.Fail($"it decodes to an invalid layout: {e.Message}", e);
        }
    }

    private BlockHash ComputeFingerprint()
    {
        Span<byte> message = stackalloc byte[FingerprintTag.Length + MaxCanonicalLength];
        FingerprintTag.CopyTo(message);
        int length = FingerprintTag.Length + CanonicalLength;
        WriteCanonical(message[FingerprintTag.Length..]);
        Span<byte> digest = stackalloc byte[SHA256.HashSizeInBytes];
        SHA256.HashData(message[..length], digest);
        return BlockHash.FromDigest(digest);
    }
}
