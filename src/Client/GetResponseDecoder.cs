using System.Buffers;
using KvFabric.Client.Grpc;

namespace KvFabric.Client;

/// <summary>
/// Decodes a kvfabric.v1.GetResponse from its wire bytes without materializing the data field (see ProtoWire).
/// Field numbers are those of fabric.proto: 1 hash, 2 block_length, 3 tier, 4 offset, 5 data, 6 in_slot.
/// </summary>
internal static class GetResponseDecoder
{
    public readonly record struct Header(bool StartsBlock, ulong BlockLength, int Tier, ulong Offset, long DataLength);

    /// <summary>Decodes one message; data is a slice of it (valid only while the message is).</summary>
    public static Header Decode(ReadOnlySequence<byte> message, out ReadOnlySequence<byte> data)
    {
        var wire = new ProtoWire(message, StatusCode.Internal, "GetResponse from the server");
        bool starts = false;
        ulong blockLength = 0, offset = 0, tier = 0;
        data = ReadOnlySequence<byte>.Empty;
        while (!wire.End)
        {
            var (field, type) = wire.Tag();
            switch (field)
            {
                case 1 when type == 2: starts = wire.Bytes().Length > 0; break;
                case 2 when type == 0: blockLength = wire.Varint(); break;
                case 3 when type == 0: tier = wire.Varint(); break;
                case 4 when type == 0: offset = wire.Varint(); break;
                case 5 when type == 2: data = wire.Bytes(); break;
                case 6 when type == 0: wire.Varint(); break;
                case >= 1 and <= 6: throw wire.WrongType(field, type);
                default: wire.Skip(type); break;
            }
        }

        return new Header(starts, blockLength, (int)tier, offset, data.Length);
    }
}
