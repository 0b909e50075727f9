using System.Text;
using KvFabric.Blocks;
using Xunit;

namespace KvFabric.Tests.Blocks;

public sealed class KvLayoutTests
{
    [Theory]
    [InlineData(KvDType.F32, 4)]
    [InlineData(KvDType.F16, 2)]
    [InlineData(KvDType.BF16, 2)]
    [InlineData(KvDType.Fp8E4M3, 1)]
    [InlineData(KvDType.Fp8E5M2, 1)]
    public void DTypeSizes(KvDType dtype, int size) => Assert.Equal(size, dtype.SizeInBytes());

    [Fact]
    public void UnknownDTypeNamesTheValue()
    {
        var e = Assert.Throws<ArgumentOutOfRangeException>(() => ((KvDType)9).SizeInBytes());
        Assert.Contains("9", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentOutOfRangeException>(() => default(KvDType).SizeInBytes());
    }

    [Theory]
    [InlineData("ModelFingerprint", "\"\"")]
    [InlineData("ModelFingerprint", "257 bytes")]
    [InlineData("Layers", "0")]
    [InlineData("Layers", "1025")]
    [InlineData("KvHeads", "-1")]
    [InlineData("HeadDim", "0")]
    [InlineData("HeadDim", "4097")]
    [InlineData("DType", "0")]
    [InlineData("DType", "6")]
    [InlineData("TokensPerBlock", "0")]
    [InlineData("TensorParallelSize", "0")]
    [InlineData("TensorParallelSize", "3 (8 heads)")]
    [InlineData("TensorParallelRank", "-1")]
    [InlineData("TensorParallelRank", "2 (size 2)")]
    public void EachBadFieldIsNamedInTheMessage(string field, string bad)
    {
        var e = Assert.Throws<ArgumentException>(() => BadLayout(field, bad));
        Assert.Contains("KvLayout." + field, e.Message, StringComparison.Ordinal);
        Assert.True(
            e.Message.Contains("allowed", StringComparison.Ordinal) || e.Message.Contains("must be divisible", StringComparison.Ordinal),
            $"the message does not say what is allowed: {e.Message}");
    }

    private static KvLayout BadLayout(string field, string bad) => (field, bad) switch
    {
        ("ModelFingerprint", "\"\"") => new("", 4, 8, 64, KvDType.F16, 16),
        ("ModelFingerprint", _) => new(new string('m', 257), 4, 8, 64, KvDType.F16, 16),
        ("Layers", _) => new("m", int.Parse(bad, System.Globalization.CultureInfo.InvariantCulture), 8, 64, KvDType.F16, 16),
        ("KvHeads", _) => new("m", 4, -1, 64, KvDType.F16, 16),
        ("HeadDim", _) => new("m", 4, 8, int.Parse(bad, System.Globalization.CultureInfo.InvariantCulture), KvDType.F16, 16),
        ("DType", _) => new("m", 4, 8, 64, (KvDType)byte.Parse(bad, System.Globalization.CultureInfo.InvariantCulture), 16),
        ("TokensPerBlock", _) => new("m", 4, 8, 64, KvDType.F16, 0),
        ("TensorParallelSize", "0") => new("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 0),
        ("TensorParallelSize", _) => new("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 3),
        ("TensorParallelRank", "-1") => new("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 2, tensorParallelRank: -1),
        _ => new("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 2, tensorParallelRank: 2),
    };

    [Fact]
    public void MessagesNameTheValueAndTheAllowedRange()
    {
        var e = Assert.Throws<ArgumentException>(() => new KvLayout("m", 0, 8, 64, KvDType.F16, 16));
        Assert.Equal("layers", e.ParamName);
        Assert.Contains("KvLayout.Layers is 0; allowed: 1 to 1024", e.Message, StringComparison.Ordinal);

        e = Assert.Throws<ArgumentException>(() => new KvLayout("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 2, tensorParallelRank: 2));
        Assert.Contains("TensorParallelRank is 2; allowed: 0 to 1", e.Message, StringComparison.Ordinal);

        e = Assert.Throws<ArgumentException>(() => new KvLayout("m", 4, 8, 64, KvDType.F16, 16, tensorParallelSize: 3));
        Assert.Contains("KvHeads (8) must be divisible by KvLayout.TensorParallelSize (3)", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void BlocksLargerThanTwoGibAreRejected()
    {
        var e = Assert.Throws<ArgumentException>(() => new KvLayout("m", 1024, 1024, 128, KvDType.F32, 4096));
        Assert.Contains("BlockBytes", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void TensorParallelSizesAndOffsets()
    {
        // 32 layers, 8 KV heads over TP 4 = 2 heads per rank, head dim 128, BF16, 16 tokens per block.
        var layout = new KvLayout("llama-3-8b@sha256:abcd", 32, 8, 128, KvDType.BF16, 16, tensorParallelSize: 4, tensorParallelRank: 1);
        const long HeadBytes = 128 * 2;
        const long TokenBytes = 2 * HeadBytes;
        const long SlabBytes = 16 * TokenBytes;

        Assert.Equal(2, layout.HeadsPerRank);
        Assert.Equal(SlabBytes, layout.LayerKvBytes);
        Assert.Equal(8192, layout.LayerKvBytes);
        Assert.Equal(32 * 2 * SlabBytes, layout.BlockBytes);
        Assert.Equal(524_288, layout.BlockBytes);

        Assert.Equal(0, layout.Offset(0, 0, 0, 0));
        Assert.Equal(HeadBytes, layout.Offset(0, 0, 0, 1));
        Assert.Equal(TokenBytes, layout.Offset(0, 0, 1, 0));
        Assert.Equal(SlabBytes, layout.Offset(0, 1, 0, 0));
        Assert.Equal(2 * SlabBytes, layout.Offset(1, 0, 0, 0));
        Assert.Equal(layout.BlockBytes - HeadBytes, layout.Offset(31, 1, 15, 1));
    }

    [Theory]
    [InlineData(-1, 0, 0, 0, "layer")]
    [InlineData(32, 0, 0, 0, "layer")]
    [InlineData(0, 2, 0, 0, "kv")]
    [InlineData(0, 0, 16, 0, "token")]
    [InlineData(0, 0, 0, 2, "head")]
    public void OffsetRejectsOutOfRangeIndices(int layer, int kv, int token, int head, string param)
    {
        var layout = new KvLayout("m", 32, 8, 128, KvDType.BF16, 16, tensorParallelSize: 4);
        Assert.Equal(param, Assert.Throws<ArgumentOutOfRangeException>(() => layout.Offset(layer, kv, token, head)).ParamName);
    }

    [Fact]
    public void CanonicalEncodingRoundTrips()
    {
        var layout = new KvLayout("llama-3-8b@sha256:abcd\u00e9", 32, 8, 128, KvDType.Fp8E5M2, 64, tensorParallelSize: 8, tensorParallelRank: 7);
        byte[] bytes = layout.ToCanonicalBytes();

        Assert.Equal(layout.CanonicalLength, bytes.Length);
        KvLayout back = KvLayout.ReadCanonical(bytes);
        Assert.Equal(layout, back);
        Assert.Equal(layout.Fingerprint, back.Fingerprint);
        Assert.Equal(bytes, back.ToCanonicalBytes());

        var larger = new byte[bytes.Length + 3];
        layout.WriteCanonical(larger);
        Assert.Equal(bytes, larger[..bytes.Length]);
        Assert.Throws<ArgumentException>(() => layout.WriteCanonical(new byte[bytes.Length - 1]));
    }

    [Fact]
    public void EqualLayoutsAreEqualAndDistinctOnesAreNot()
    {
        var a = new KvLayout("m", 4, 8, 64, KvDType.F16, 16);
        Assert.Equal(a, new KvLayout("m", 4, 8, 64, KvDType.F16, 16));
        Assert.Equal(a.GetHashCode(), new KvLayout("m", 4, 8, 64, KvDType.F16, 16).GetHashCode());
        Assert.NotEqual(a, new KvLayout("m", 4, 8, 64, KvDType.F16, 32));
    }

    [Fact]
    public void MalformedCanonicalInputGivesClearErrors()
    {
        byte[] good = SpecVectors.LayoutA.ToCanonicalBytes();

        Assert.Contains("truncated", ReadError(good[..^1]), StringComparison.Ordinal);
        Assert.Contains("truncated", ReadError([]), StringComparison.Ordinal);
        Assert.Contains("trailing", ReadError([.. good, 0]), StringComparison.Ordinal);
        Assert.Contains("tag", ReadError(Mutate(good, 0, (byte)'K')), StringComparison.Ordinal);
        Assert.Contains("version is 2", ReadError(Mutate(good, 15, 2)), StringComparison.Ordinal);

        // Fields sit after tag(15) version(1) length(4) "tiny-llama@seed-1"(17): layers at 37.
        Assert.Contains("KvLayout.Layers is 0", ReadError(Mutate(good, 37, 0)), StringComparison.Ordinal);
        Assert.Contains("larger than", ReadError(Mutate(good, 40, 0x80)), StringComparison.Ordinal);
        Assert.Contains("KvLayout.DType is 7", ReadError(Mutate(good, 49, 7)), StringComparison.Ordinal);

        byte[] badUtf8 = Mutate(good, 20, 0xff);
        Assert.Contains("not valid UTF-8", ReadError(badUtf8), StringComparison.Ordinal);

        byte[] longString = Mutate(good, 17, 0x01);
        Assert.Contains("273 bytes; at most 256", ReadError(longString), StringComparison.Ordinal);
    }

    [Fact]
    public void DescribeIsOneReadableLine()
    {
        string text = SpecVectors.LayoutB.Describe();
        Assert.DoesNotContain('\n', text);
        Assert.Contains("llama-3-70b@sha256:0123abcd", text, StringComparison.Ordinal);
        Assert.Contains("80 layers", text, StringComparison.Ordinal);
        Assert.Contains("TP rank 3/4", text, StringComparison.Ordinal);
        Assert.Contains("BF16", text, StringComparison.Ordinal);
        Assert.Contains(SpecVectors.LayoutB.Fingerprint.ToString(), text, StringComparison.Ordinal);
    }

    [Fact]
    public void ModelFingerprintLimitIsInUtf8Bytes()
    {
        _ = new KvLayout(new string('\u00e9', 128), 4, 8, 64, KvDType.F16, 16);
        var e = Assert.Throws<ArgumentException>(() => new KvLayout(new string('\u00e9', 129), 4, 8, 64, KvDType.F16, 16));
        Assert.Contains("258 UTF-8 bytes", e.Message, StringComparison.Ordinal);
        Assert.Equal(258, Encoding.UTF8.GetByteCount(new string('\u00e9', 129)));
    }

    private static string ReadError(byte[] bytes) =>
        Assert.Throws<FormatException>(() => KvLayout.ReadCanonical(bytes)).Message;

    private static byte[] Mutate(byte[] bytes, int index, byte value)
    {
        byte[] copy = [.. bytes];
        copy[index] = value;
        return copy;
    }
}
