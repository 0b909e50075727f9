using System.Buffers;
using Google.Protobuf;

namespace KvFabric.Client;

/// <summary>
/// Decodes a kvfabric.v1.GetResponse from its wire bytes without materializing the data field: the chunk is copied once,
/// straight into the caller's block buffer (the generated parser would copy it into a new array first).
/// Field numbers are those of fabric.proto: 1 hash, 2 block_length, 3 tier, 4 offset, 5 data, 6 in_slot.
/// </summary>
internal static class GetResponseDecoder
{
    public readonly record struct Header(bool StartsBlock, ulong BlockLength, int Tier, ulong Offset, long DataLength);

    /// <summary>Decodes one message; data is a slice of it (valid only while the message is).</summary>
    public static Header Decode(ReadOnlySequence<byte> message, out ReadOnlySequence<byte> data)
    {
        var r = new SequenceReader<byte>(message);
        bool starts = false;
        ulong blockLength = 0, offset = 0, tier = 0;
        data = ReadOnlySequence<byte>.Empty;
        while (!r.End)
        {
            ulong tag = Varint(ref r);
            int field = (int)(tag >> 3), wire = (int)(tag & 7);
            switch ((field, wire))
            {
                case (1, 2):
                    starts = Length(ref r, out _) > 0;
                    break;
                case (2, 0):
                    blockLength = Varint(ref r);
                    break;
                case (3, 0):
                    tier = Varint(ref r);
                    break;
                case (4, 0):
                    offset = Varint(ref r);
                    break;
                case (5, 2):
                    Length(ref r, out data);
                    break;
                default:
                    Skip(ref r, wire);
                    break;
            }
        }

        return new Header(starts, blockLength, (int)tier, offset, data.Length);
    }

    private static long Length(ref SequenceReader<byte> r, out ReadOnlySequence<byte> bytes)
    {
        ulong n = Varint(ref r);
        if (n > (ulong)r.Remaining)
            throw new KvFabric.Client.Grpc.RpcException(KvFabric.Client.Grpc.StatusCode.Internal, "malformed GetResponse from the server: " + $"a length-delimited field claims {n} bytes; {r.Remaining} remain in the message");
        bytes = r.Sequence.Slice(r.Position, (long)n);
        r.Advance((long)n);
        return (long)n;
    }

    private static void Skip(ref SequenceReader<byte> r, int wire)
    {
        switch (wire)
        {
            case 0:
                Varint(ref r);
                break;
            case 1:
                Advance(ref r, 8);
                break;
            case 2:
                Length(ref r, out _);
                break;
            case 5:
                Advance(ref r, 4);
                break;
            default:
                throw new KvFabric.Client.Grpc.RpcException(KvFabric.Client.Grpc.StatusCode.Internal, "malformed GetResponse from the server: " + $"wire type {wire} is not valid in a GetResponse");
        }
    }

    private static void Advance(ref SequenceReader<byte> r, int n)
    {
        if (r.Remaining < n)
            throw new KvFabric.Client.Grpc.RpcException(KvFabric.Client.Grpc.StatusCode.Internal, "malformed GetResponse from the server: " + "the message ends inside a fixed-width field");
        r.Advance(n);
    }

    private static ulong Varint(ref SequenceReader<byte> r)
    {
        ulong value = 0;
        for (int shift = 0; shift < 64; shift += 7)
        {
            if (!r.TryRead(out byte b))
                throw new KvFabric.Client.Grpc.RpcException(KvFabric.Client.Grpc.StatusCode.Internal, "malformed GetResponse from the server: " + "the message ends inside a varint");
            value |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80)
                return value;
        }

        throw new KvFabric.Client.Grpc.RpcException(KvFabric.Client.Grpc.StatusCode.Internal, "malformed GetResponse from the server: " + "a varint is longer than 10 bytes");
    }
}
