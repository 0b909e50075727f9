using System.Buffers.Binary;
using System.Runtime.InteropServices;
using System.Text;

namespace KvFabric.Blocks;

// The primitive encodings of hashing spec v1 (docs/hashing.md): little-endian integers, u32-length-prefixed UTF-8.
internal static class SpecEncoding
{
    // Strict both ways: a lone surrogate must not silently become U+FFFD, or two different strings would share a hash.
    private static readonly UTF8Encoding StrictUtf8 = new(encoderShouldEmitUTF8Identifier: false, throwOnInvalidBytes: true);

    // Validates a spec string (non-empty, well-formed, at most maxBytes of UTF-8) and returns its UTF-8 length.
    public static int Utf8Length(string? value, string paramName, string what, int maxBytes)
    {
        if (value is null)
        {
            throw new ArgumentNullException(paramName, $"{what} must not be null.");
        }

        if (value.Length == 0)
        {
            throw new ArgumentException($"{what} is empty; allowed: 1 to {maxBytes} UTF-8 bytes.", paramName);
        }

        int bytes;
        try
        {
            bytes = StrictUtf8.GetByteCount(value);
        }
        catch (EncoderFallbackException e)
        {
            throw new ArgumentException($"{what} has an unpaired surrogate at index {e.Index}; allowed: well-formed Unicode text.", paramName, e);
        }

        if (bytes > maxBytes)
        {
            throw new ArgumentException($"{what} is {bytes} UTF-8 bytes; allowed: 1 to {maxBytes}.", paramName);
        }

        return bytes;
    }

    public static string DecodeUtf8(ReadOnlySpan<byte> bytes) => StrictUtf8.GetString(bytes);

    public static int EncodeUtf8(string value, Span<byte> destination) => StrictUtf8.GetBytes(value, destination);
}

// Appends spec fields to a caller-provided buffer; the caller sizes the buffer exactly, so overruns are bugs, not input errors.
internal ref struct SpecWriter(Span<byte> buffer)
{
    private readonly Span<byte> _buffer = buffer;
    private int _position;

    public readonly int Position => _position;

    public Span<byte> Take(int length)
    {
        Span<byte> slot = _buffer.Slice(_position, length);
        _position += length;
        return slot;
    }

    public void Raw(scoped ReadOnlySpan<byte> bytes) => bytes.CopyTo(Take(bytes.Length));

    public void U8(byte value) => Take(1)[0] = value;

    public void U32(uint value) => BinaryPrimitives.WriteUInt32LittleEndian(Take(4), value);

    // The caller has validated the string and knows its UTF-8 length.
    public void Str(string value, int utf8Length)
    {
        U32((uint)utf8Length);
        SpecEncoding.EncodeUtf8(value, Take(utf8Length));
    }

    // Token ids are validated non-negative, so their int32 bytes equal their u32 bytes.
    public void Tokens(scoped ReadOnlySpan<int> tokens)
    {
        Span<byte> slot = Take(checked(tokens.Length * sizeof(int)));
        if (BitConverter.IsLittleEndian)
        {
            MemoryMarshal.AsBytes(tokens).CopyTo(slot);
        }
        else
        {
            for (int i = 0; i < tokens.Length; i++)
            {
                BinaryPrimitives.WriteInt32LittleEndian(slot[(i * sizeof(int))..], tokens[i]);
            }
        }
    }
}

// Reads spec fields from untrusted bytes; every failure is a FormatException that says what and where.
internal ref struct SpecReader(ReadOnlySpan<byte> input, string what)
{
    private readonly ReadOnlySpan<byte> _input = input;
    private readonly string _what = what;
    private int _position;

    public readonly int Remaining => _input.Length - _position;

    public ReadOnlySpan<byte> Take(int length, string field)
    {
        if (length > Remaining)
        {
            throw Fail($"truncated: {field} needs {length} bytes at offset {_position}, only {Remaining} remain");
        }

        ReadOnlySpan<byte> slot = _input.Slice(_position, length);
        _position += length;
        return slot;
    }

    public byte U8(string field) => Take(1, field)[0];

    public uint U32(string field) => BinaryPrimitives.ReadUInt32LittleEndian(Take(4, field));

    // A u32 that must fit a positive-or-zero int; larger values are rejected here rather than wrapping to negatives.
    public int Int(string field)
    {
        int at = _position;
        uint value = U32(field);
        if (value > int.MaxValue)
        {
            throw Fail($"{field} at offset {at} is {value}, larger than {int.MaxValue}");
        }

        return (int)value;
    }

    public string Str(string field, int maxBytes)
    {
        int at = _position;
        uint length = U32(field + " length");
        if (length > maxBytes)
        {
            throw Fail($"{field} length at offset {at} is {length} bytes; at most {maxBytes} are allowed");
        }

        ReadOnlySpan<byte> bytes = Take((int)length, field);
        try
        {
            return SpecEncoding.DecodeUtf8(bytes);
        }
        catch (DecoderFallbackException e)
        {
            throw new FormatException($"Malformed {_what}: {field} at offset {at + 4} is not valid UTF-8.", e);
        }
    }

    public readonly void End()
    {
        if (Remaining != 0)
        {
            throw Fail($"{Remaining} unexpected trailing bytes at offset {_position}");
        }
    }

    public readonly FormatException Fail(string detail, Exception? inner = null) => new($"Malformed {_what}: {detail}.", inner);
}
