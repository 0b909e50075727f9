using System.Buffers;
using System.Buffers.Binary;
using System.IO.Compression;
using System.IO.Pipelines;
using Google.Protobuf;

namespace KvFabric.Client.Grpc;

/// <summary>
/// gRPC's length-prefixed message framing (1 byte compressed flag, 4 bytes big-endian length, the message), read from a
/// PipeReader and written to a PipeWriter. The client and the server both use this one implementation.
/// </summary>
public static class GrpcFraming
{
    /// <summary>Writes one message; the caller flushes (or not, to batch several).</summary>
    public static void Write(PipeWriter writer, IMessage message)
    {
        int size = message.CalculateSize();
        Span<byte> prefix = writer.GetSpan(GrpcProtocol.MessagePrefixBytes);
        prefix[0] = 0;
        BinaryPrimitives.WriteUInt32BigEndian(prefix[1..], (uint)size);
        writer.Advance(GrpcProtocol.MessagePrefixBytes);
        if (size > 0)
            message.WriteTo(writer);
    }

    /// <summary>One message as it goes on the wire (prefix and bytes), for tools that send raw request bodies.</summary>
    public static byte[] ToFrame(IMessage message)
    {
        int size = message.CalculateSize();
        var frame = new byte[GrpcProtocol.MessagePrefixBytes + size];
        BinaryPrimitives.WriteUInt32BigEndian(frame.AsSpan(1), (uint)size);
        message.WriteTo(frame.AsSpan(GrpcProtocol.MessagePrefixBytes));
        return frame;
    }

    public static async ValueTask WriteAndFlushAsync(PipeWriter writer, IMessage message, CancellationToken cancellationToken)
    {
        Write(writer, message);
        FlushResult flushed = await writer.FlushAsync(cancellationToken).ConfigureAwait(false);
        if (flushed.IsCanceled || flushed.IsCompleted)
            throw new RpcException(StatusCode.Cancelled, "the peer stopped reading this stream");
    }

    /// <summary>
    /// Reads the next message and parses it. Null at a clean end of stream (between messages). A stream that ends inside
    /// a message, a message over maxMessageBytes, a compressed message without a known encoding, and bytes that are not
    /// a valid protobuf message each throw an RpcException with the matching status.
    /// </summary>
    public static ValueTask<T?> ReadAsync<T>(PipeReader reader, MessageParser<T> parser, int maxMessageBytes,
        string? encoding, CancellationToken cancellationToken) where T : class, IMessage<T> =>
        ReadAsync(reader, payload => Parse(payload, parser), maxMessageBytes, encoding, cancellationToken);

    /// <summary>
    /// Reads the next message and hands its (decompressed) bytes to decode, which must not keep them: they are only valid
    /// during the call. Null at a clean end of stream. For decoders that place bytes straight where they belong.
    /// </summary>
    public static async ValueTask<T?> ReadAsync<T>(PipeReader reader, Func<ReadOnlySequence<byte>, T> decode, int maxMessageBytes,
        string? encoding, CancellationToken cancellationToken) where T : class
    {
        while (true)
        {
            ReadResult result = await reader.ReadAsync(cancellationToken).ConfigureAwait(false);
            ReadOnlySequence<byte> buffer = result.Buffer;
            if (buffer.Length >= GrpcProtocol.MessagePrefixBytes)
            {
                (byte flag, uint length) = ReadPrefix(buffer);
                if (flag > 1)
                {
                    reader.AdvanceTo(buffer.Start);
                    throw new RpcException(StatusCode.Internal, $"malformed gRPC frame: compressed-flag byte is {flag}, only 0 or 1 are defined");
                }

                if (length > (uint)maxMessageBytes)
                {
                    reader.AdvanceTo(buffer.Start);
                    throw new RpcException(StatusCode.ResourceExhausted,
                        $"received message of {length} bytes is larger than the limit of {maxMessageBytes} bytes; send smaller chunks or raise the max message size");
                }

                long total = GrpcProtocol.MessagePrefixBytes + (long)length;
                if (buffer.Length >= total)
                {
                    ReadOnlySequence<byte> payload = buffer.Slice(GrpcProtocol.MessagePrefixBytes, length);
                    try
                    {
                        return flag == 1 ? DecodeCompressed(payload, decode, maxMessageBytes, encoding) : decode(payload);
                    }
                    finally
                    {
                        reader.AdvanceTo(buffer.GetPosition(total));
                    }
                }

                if (result.IsCompleted)
                {
                    reader.AdvanceTo(buffer.Start, buffer.End);
                    throw new RpcException(StatusCode.Internal,
                        $"stream ended inside a message: {buffer.Length - GrpcProtocol.MessagePrefixBytes} of {length} bytes arrived");
                }

                reader.AdvanceTo(buffer.Start, buffer.End);
                continue;
            }

            if (result.IsCompleted)
            {
                reader.AdvanceTo(buffer.Start, buffer.End);
                if (buffer.Length == 0)
                    return null;
                throw new RpcException(StatusCode.Internal, $"stream ended inside a message prefix ({buffer.Length} of 5 bytes)");
            }

            if (result.IsCanceled)
                throw new OperationCanceledException(cancellationToken);
            reader.AdvanceTo(buffer.Start, buffer.End);
        }
    }

    private static (byte Flag, uint Length) ReadPrefix(in ReadOnlySequence<byte> buffer)
    {
        Span<byte> prefix = stackalloc byte[GrpcProtocol.MessagePrefixBytes];
        buffer.Slice(0, GrpcProtocol.MessagePrefixBytes).CopyTo(prefix);
        return (prefix[0], BinaryPrimitives.ReadUInt32BigEndian(prefix[1..]));
    }

    private static T Parse<T>(ReadOnlySequence<byte> payload, MessageParser<T> parser) where T : IMessage<T>
    {
        try
        {
            return parser.ParseFrom(payload);
        }
        catch (InvalidProtocolBufferException e)
        {
            throw new RpcException(StatusCode.InvalidArgument,
                $"malformed protobuf: the {payload.Length}-byte message is not a valid {typeof(T).Name} ({e.Message})", e);
        }
    }

    private static T DecodeCompressed<T>(ReadOnlySequence<byte> payload, Func<ReadOnlySequence<byte>, T> decode, int maxMessageBytes, string? encoding)
    {
        if (!string.Equals(encoding, "gzip", StringComparison.OrdinalIgnoreCase))
        {
            throw new RpcException(StatusCode.Unimplemented,
                $"message is compressed but grpc-encoding is '{encoding ?? "(none)"}'; supported: {GrpcProtocol.SupportedEncodings}");
        }

        byte[] rented = ArrayPool<byte>.Shared.Rent((int)Math.Min(maxMessageBytes + 1L, Math.Max(payload.Length * 4, 4096)));
        try
        {
            int size = 0;
            using (var input = new ReadOnlySequenceStream(payload))
            using (var gzip = new GZipStream(input, CompressionMode.Decompress))
            {
                while (true)
                {
                    if (size == rented.Length)
                    {
                        if (rented.Length > maxMessageBytes)
                        {
                            throw new RpcException(StatusCode.ResourceExhausted,
                                $"decompressed message is larger than the limit of {maxMessageBytes} bytes");
                        }

                        byte[] bigger = ArrayPool<byte>.Shared.Rent((int)Math.Min(maxMessageBytes + 1L, rented.Length * 2L));
                        rented.AsSpan(0, size).CopyTo(bigger);
                        ArrayPool<byte>.Shared.Return(rented);
                        rented = bigger;
                    }

                    int n = gzip.Read(rented, size, rented.Length - size);
                    if (n == 0)
                        break;
                    size += n;
                }
            }

            if (size > maxMessageBytes)
                throw new RpcException(StatusCode.ResourceExhausted, $"decompressed message is larger than the limit of {maxMessageBytes} bytes");
            return decode(new ReadOnlySequence<byte>(rented, 0, size));
        }
        catch (InvalidDataException e)
        {
            throw new RpcException(StatusCode.Internal, $"gzip-compressed message could not be decompressed ({e.Message})", e);
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(rented);
        }
    }

    /// <summary>A read-only stream over a ReadOnlySequence (for GZipStream).</summary>
    private sealed class ReadOnlySequenceStream(ReadOnlySequence<byte> sequence) : Stream
    {
        private ReadOnlySequence<byte> _rest = sequence;

        public override bool CanRead => true;
        public override bool CanSeek => false;
        public override bool CanWrite => false;
        public override long Length => throw new NotSupportedException();
        public override long Position { get => throw new NotSupportedException(); set => throw new NotSupportedException(); }
        public override void Flush() { }
        public override int Read(byte[] buffer, int offset, int count) => Read(buffer.AsSpan(offset, count));

        public override int Read(Span<byte> buffer)
        {
            int n = (int)Math.Min(buffer.Length, _rest.Length);
            _rest.Slice(0, n).CopyTo(buffer);
            _rest = _rest.Slice(n);
            return n;
        }

        public override long Seek(long offset, SeekOrigin origin) => throw new NotSupportedException();
        public override void SetLength(long value) => throw new NotSupportedException();
        public override void Write(byte[] buffer, int offset, int count) => throw new NotSupportedException();
    }
}
