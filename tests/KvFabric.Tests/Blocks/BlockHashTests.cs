using KvFabric.Blocks;
using Xunit;

namespace KvFabric.Tests.Blocks;

public sealed class BlockHashTests
{
    private static readonly BlockHash Sample = new(0x0123456789abcdefUL, 0xfedcba9876543210UL);

    [Fact]
    public void BytesAreBigEndianHiThenLo()
    {
        var bytes = new byte[BlockHash.Size];
        Sample.WriteTo(bytes);

        Assert.Equal(Convert.FromHexString("0123456789abcdeffedcba9876543210"), bytes);
        Assert.Equal(Sample, BlockHash.FromBytes(bytes));
    }

    [Fact]
    public void HexIsLowercaseAndRoundTrips()
    {
        Assert.Equal("0123456789abcdeffedcba9876543210", Sample.ToString());
        Assert.Equal(Sample, BlockHash.Parse(Sample.ToString()));
        Assert.Equal(Sample, BlockHash.Parse("0123456789ABCDEFFEDCBA9876543210"));
        Assert.Equal("00000000000000000000000000000000", default(BlockHash).ToString());
    }

    [Fact]
    public void FromBytesNamesTheExpectedAndReceivedLengths()
    {
        var e = Assert.Throws<ArgumentException>(() => BlockHash.FromBytes(new byte[15]));
        Assert.Contains("exactly 16 bytes", e.Message, StringComparison.Ordinal);
        Assert.Contains("got 15", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => BlockHash.FromBytes(new byte[17]));
    }

    [Fact]
    public void WriteToNeedsSixteenBytes() =>
        Assert.Throws<ArgumentException>(() => Sample.WriteTo(new byte[15]));

    [Theory]
    [InlineData("")]
    [InlineData("0123456789abcdeffedcba987654321")]
    [InlineData("0123456789abcdeffedcba98765432100")]
    [InlineData("0123456789abcdeffedcba987654321g")]
    [InlineData(" 123456789abcdeffedcba9876543210")]
    [InlineData("-123456789abcdeffedcba9876543210")]
    [InlineData("0x23456789abcdeffedcba9876543210")]
    public void MalformedHexIsRejected(string text)
    {
        Assert.False(BlockHash.TryParse(text, out var hash));
        Assert.Equal(default, hash);
        Assert.Contains("32 hex digits", Assert.Throws<FormatException>(() => BlockHash.Parse(text)).Message, StringComparison.Ordinal);
    }

    [Fact]
    public void NullIsNotParsed()
    {
        Assert.False(BlockHash.TryParse((string?)null, out _));
        Assert.Throws<ArgumentNullException>(() => BlockHash.Parse(null!));
    }
}
