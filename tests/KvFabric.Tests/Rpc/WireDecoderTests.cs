using System.Buffers;
using Google.Protobuf;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>The hand-written decoders agree with Google.Protobuf's serializer, and refuse what it would refuse.</summary>
public sealed class WireDecoderTests
{
    [Fact]
    public void GetResponse_decoder_matches_the_generated_serializer_on_random_messages()
    {
        var rng = new Random(5);
        for (int i = 0; i < 500; i++)
        {
            var m = new GetResponse
            {
                Hash = rng.Next(2) == 0 ? ByteString.Empty : ByteString.CopyFrom(RandomBytes(rng, 16)),
                BlockLength = (ulong)rng.NextInt64(0, long.MaxValue) >> rng.Next(64),
                Tier = (Tier)rng.Next(4),
                Offset = (ulong)rng.Next(),
                Data = ByteString.CopyFrom(RandomBytes(rng, rng.Next(0, 3000))),
                InSlot = rng.Next(2) == 0,
            };
            byte[] wire = m.ToByteArray();
            // Split the bytes over several segments, as a pipe delivers them.
            var h = GetResponseDecoder.Decode(Segmented(wire, rng.Next(1, 64)), out var data);
            Assert.Equal(!m.Hash.IsEmpty, h.StartsBlock);
            Assert.Equal(m.BlockLength, h.BlockLength);
            Assert.Equal((int)m.Tier, h.Tier);
            Assert.Equal(m.Offset, h.Offset);
            Assert.Equal(m.Data.ToByteArray(), data.ToArray());
        }
    }

    [Fact]
    public void Truncated_and_mistyped_fields_are_refused()
    {
        byte[] wire = new GetResponse { Hash = ByteString.CopyFrom(new byte[16]), Data = ByteString.CopyFrom(new byte[100]) }.ToByteArray();
        for (int cut = 1; cut < wire.Length; cut += 7)
            Assert.Throws<RpcException>(() => GetResponseDecoder.Decode(new ReadOnlySequence<byte>(wire, 0, cut), out _));
        byte[] mistyped = [(5 << 3) | 0, 1]; // data (field 5) as a varint
        Assert.Equal(StatusCode.Internal, Assert.Throws<RpcException>(() => GetResponseDecoder.Decode(new ReadOnlySequence<byte>(mistyped), out _)).Status);
        byte[] unknownField = [0x98, 0x06, 7, (4 << 3) | 0, 42]; // field 99 (an unknown varint) is skipped
        Assert.Equal(42ul, GetResponseDecoder.Decode(new ReadOnlySequence<byte>(unknownField), out _).Offset);
    }

    private static byte[] RandomBytes(Random rng, int n)
    {
        var b = new byte[n];
        rng.NextBytes(b);
        return b;
    }

    private sealed class Segment : ReadOnlySequenceSegment<byte>
    {
        public Segment(ReadOnlyMemory<byte> memory, long runningIndex)
        {
            Memory = memory;
            RunningIndex = runningIndex;
        }

        public Segment Append(ReadOnlyMemory<byte> memory)
        {
            var next = new Segment(memory, RunningIndex + Memory.Length);
            Next = next;
            return next;
        }
    }

    private static ReadOnlySequence<byte> Segmented(byte[] bytes, int segmentSize)
    {
        if (bytes.Length == 0)
            return ReadOnlySequence<byte>.Empty;
        var first = new Segment(bytes.AsMemory(0, Math.Min(segmentSize, bytes.Length)), 0);
        Segment last = first;
        for (int off = segmentSize; off < bytes.Length; off += segmentSize)
            last = last.Append(bytes.AsMemory(off, Math.Min(segmentSize, bytes.Length - off)));
        return new ReadOnlySequence<byte>(first, 0, last, last.Memory.Length);
    }
}

/// <summary>The raw Get reader places chunks right whatever the field order, and refuses broken streams.</summary>
public sealed class RawGetReaderTests
{
    private static byte[] Framed(params byte[][] messages) =>
        messages.SelectMany(m => new byte[] { 0, (byte)(m.Length >> 24), (byte)(m.Length >> 16), (byte)(m.Length >> 8), (byte)m.Length }.Concat(m)).ToArray();

    private static byte[] Field(int number, byte[] bytes) => [(byte)((number << 3) | 2), (byte)bytes.Length, .. bytes];

    private static byte[] Varint(int number, byte value) => [(byte)(number << 3), value];

    [Fact]
    public async Task Chunks_land_at_their_offsets_even_when_the_offset_follows_the_data()
    {
        const int blockBytes = 8;
        byte[] first = [.. Field(1, new byte[16]), .. Varint(2, blockBytes), .. Varint(3, 2), .. Field(5, [1, 2, 3, 4])];
        byte[] second = [.. Field(5, [5, 6, 7, 8]), .. Varint(4, 4)]; // offset after data
        using var body = new MemoryStream(Framed(first, second));
        var dest = new byte[blockBytes];
        var tiers = new Tier[1];
        int blocks = await new RawGetReader(body, 1 << 20, CancellationToken.None).ReadAllAsync(dest, blockBytes, 1, tiers);
        Assert.Equal(1, blocks);
        Assert.Equal(new byte[] { 1, 2, 3, 4, 5, 6, 7, 8 }, dest);
        Assert.Equal(Tier.Host, tiers[0]);
    }

    [Fact]
    public async Task An_offset_after_the_data_that_disagrees_with_the_order_is_an_error()
    {
        byte[] first = [.. Field(1, new byte[16]), .. Varint(2, 8), .. Field(5, [1, 2, 3, 4])];
        byte[] second = [.. Field(5, [5, 6]), .. Varint(4, 6)]; // the next chunk starts at 4, not 6
        using var body = new MemoryStream(Framed(first, second));
        await Assert.ThrowsAsync<KvFabric.Client.Grpc.RpcException>(async () =>
            await new RawGetReader(body, 1 << 20, CancellationToken.None).ReadAllAsync(new byte[8], 8, 1, new Tier[1]));
    }

    [Fact]
    public async Task A_stream_cut_inside_a_message_is_an_error()
    {
        byte[] framed = Framed([.. Field(1, new byte[16]), .. Varint(2, 8), .. Field(5, [1, 2, 3, 4])]);
        using var body = new MemoryStream(framed[..^2]);
        await Assert.ThrowsAnyAsync<Exception>(async () =>
            await new RawGetReader(body, 1 << 20, CancellationToken.None).ReadAllAsync(new byte[8], 8, 1, new Tier[1]));
    }
}
