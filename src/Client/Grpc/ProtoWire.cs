using System.Buffers;

namespace KvFabric.Client.Grpc;

/// <summary>
/// Reading protobuf wire format by hand over a ReadOnlySequence, for the two messages that carry block bytes
/// (PutRequest on the server, GetResponse on the client): their `data` field is copied once, straight to where it
/// belongs, instead of into a new array first. Malformed input throws RpcException with the given status.
/// </summary>
public ref struct ProtoWire(ReadOnlySequence<byte> message, StatusCode onError, string messageName)
{
    private SequenceReader<byte> _r = new(message);

    public readonly bool End => _r.End;

    /// <summary>Reads the next field's tag: (field number, wire type).</summary>
    public (int Field, int Wire) Tag()
    {
        ulong tag = Varint();
        return ((int)(tag >> 3), (int)(tag & 7));
    }

    public ulong Varint()
    {
        ulong value = 0;
        for (int shift = 0; shift < 64; shift += 7)
        {
            if (!_r.TryRead(out byte b))
                throw Error("the message ends inside a varint");
            value |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80)
                return value;
        }

        throw Error("a varint is longer than 10 bytes");
    }

    /// <summary>A length-delimited field's bytes (a slice of the message, valid as long as it is).</summary>
    public ReadOnlySequence<byte> Bytes()
    {
        ulong n = Varint();
        if (n > (ulong)_r.Remaining)
            throw Error($"a length-delimited field claims {n} bytes; {_r.Remaining} remain");
        ReadOnlySequence<byte> bytes = _r.Sequence.Slice(_r.Position, (long)n);
        _r.Advance((long)n);
        return bytes;
    }

    /// <summary>Skips a field of an unknown number (forward compatibility).</summary>
    public void Skip(int wire)
    {
        switch (wire)
        {
            case 0:
                Varint();
                break;
            case 1:
                Advance(8);
                break;
            case 2:
                Bytes();
                break;
            case 5:
                Advance(4);
                break;
            default:
                throw Error($"wire type {wire} is not valid");
        }
    }

    /// <summary>A field number known to the decoder arrived with the wrong wire type.</summary>
    public readonly RpcException WrongType(int field, int wire) => Error($"field {field} has wire type {wire}");

    private void Advance(int n)
    {
        if (_r.Remaining < n)
            throw Error("the message ends inside a fixed-width field");
        _r.Advance(n);
    }

    private readonly RpcException Error(string what) => new(onError, $"malformed protobuf: not a valid {messageName} ({what})");
}
