using KvFabric.Compression;
using KvFabric.Transfer.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Compression;

public sealed class ZstdTests
{
    [Fact]
    public void Structured_bytes_round_trip_smaller()
    {
        var block = new byte[256 << 10];
        for (int i = 0; i < block.Length; i++)
            block[i] = (byte)(i % 61);
        var compressed = new byte[Zstd.CompressBound(block.Length)];
        Assert.True(Zstd.TryCompress(block, compressed, level: 1, out int written));
        Assert.InRange(written, 1, block.Length / 16);
        var back = new byte[block.Length];
        Assert.Equal(block.Length, Zstd.Decompress(compressed.AsSpan(0, written), back));
        Assert.Equal(block, back);
    }

    [Fact]
    public void Noise_does_not_fit_a_destination_smaller_than_itself()
    {
        var noise = new byte[64 << 10];
        DataPattern.Fill(noise, 3, 0);
        Assert.False(Zstd.TryCompress(noise, new byte[noise.Length * 7 / 8], level: 1, out int written));
        Assert.Equal(0, written);
    }

    [Fact]
    public void A_damaged_frame_is_reported_not_returned()
    {
        var block = new byte[4096];
        var compressed = new byte[Zstd.CompressBound(block.Length)];
        Assert.True(Zstd.TryCompress(block, compressed, level: 3, out int written));
        compressed[0] ^= 0xFF; // the frame's magic number
        var e = Assert.Throws<InvalidDataException>(() => Zstd.Decompress(compressed.AsSpan(0, written), new byte[block.Length]));
        Assert.Contains("zstd could not decompress", e.Message);
    }
}
