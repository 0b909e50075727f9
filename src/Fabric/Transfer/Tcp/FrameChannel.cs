using System.Buffers;
using System.IO.Pipelines;
using System.Net.Sockets;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// One TCP connection's framing, shared by both ends. Headers (and small control payloads) are parsed from a
/// <see cref="PipeReader"/>, so frames survive any split of the byte stream; bulk payloads are received straight from
/// the socket into registered memory once the few bytes already buffered in the pipe are copied out, and sent straight
/// from registered memory. No managed buffer per block on either side.
/// </summary>
internal sealed class FrameChannel : IAsyncDisposable
{
    private const int PipeBufferBytes = 4096;
    private readonly Socket _socket;
    private readonly PipeReader _reader;
    private readonly byte[] _sendHeader = GC.AllocateArray<byte>(FrameHeader.Size, pinned: true);
    private readonly NativeMemoryManager _sendPayload = new();
    private readonly NativeMemoryManager _recvPayload = new();
    private byte[]? _drain;

    public FrameChannel(Socket socket)
    {
        _socket = socket;
        _socket.NoDelay = true;
        _reader = PipeReader.Create(new NetworkStream(socket, ownsSocket: false),
            new StreamPipeReaderOptions(bufferSize: PipeBufferBytes, minimumReadSize: 1024, leaveOpen: true));
    }

    /// <summary>Serializes senders: a header and its payload must be contiguous on the wire.</summary>
    public SemaphoreSlim SendLock { get; } = new(1, 1);

    public async ValueTask<FrameHeader> ReadHeaderAsync(CancellationToken ct)
    {
        while (true)
        {
            var result = await _reader.ReadAsync(ct).ConfigureAwait(false);
            var buffer = result.Buffer;
            if (buffer.Length >= FrameHeader.Size)
            {
                var header = Parse(buffer.Slice(0, FrameHeader.Size));
                _reader.AdvanceTo(buffer.GetPosition(FrameHeader.Size));
                return header;
            }
            if (result.IsCompleted)
            {
                _reader.AdvanceTo(buffer.End);
                throw new EndOfStreamException(buffer.Length == 0
                    ? "the peer closed the connection"
                    : $"the peer closed the connection inside a frame header ({buffer.Length} of {FrameHeader.Size} bytes)");
            }
            _reader.AdvanceTo(buffer.Start, buffer.End);
        }
    }

    private static FrameHeader Parse(ReadOnlySequence<byte> header)
    {
        if (header.IsSingleSegment)
            return FrameHeader.Read(header.FirstSpan);
        Span<byte> tmp = stackalloc byte[FrameHeader.Size];
        header.CopyTo(tmp);
        return FrameHeader.Read(tmp);
    }

    /// <summary>Receives exactly <paramref name="length"/> payload bytes into native memory at <paramref name="destination"/>.</summary>
    public async ValueTask ReceiveAsync(nint destination, int length, CancellationToken ct)
    {
        int got = TakeBuffered(destination, length);
        while (got < length)
        {
            int n = await _socket.ReceiveAsync(_recvPayload.Reset(destination + got, length - got), SocketFlags.None, ct).ConfigureAwait(false);
            if (n == 0)
                throw new EndOfStreamException($"the peer closed the connection after {got} of {length} payload bytes");
            got += n;
        }
    }

    /// <summary>Receives a small control payload (hello, notification) into a new array.</summary>
    public async ValueTask<byte[]> ReceiveSmallAsync(int length, CancellationToken ct)
    {
        byte[] data = GC.AllocateUninitializedArray<byte>(length, pinned: true);
        await ReceiveAsync(PinnedAddress(data), length, ct).ConfigureAwait(false);
        return data;
    }

    /// <summary>Reads and discards a payload that was refused, so the stream stays in frame.</summary>
    public async ValueTask DrainAsync(int length, CancellationToken ct)
    {
        _drain ??= GC.AllocateUninitializedArray<byte>(64 * 1024, pinned: true);
        nint scratch = PinnedAddress(_drain);
        while (length > 0)
        {
            int n = Math.Min(length, _drain.Length);
            await ReceiveAsync(scratch, n, ct).ConfigureAwait(false);
            length -= n;
        }
    }

    private unsafe int TakeBuffered(nint destination, int length)
    {
        if (!_reader.TryRead(out var result))
            return 0;
        var buffer = result.Buffer;
        int take = (int)Math.Min(buffer.Length, length);
        buffer.Slice(0, take).CopyTo(new Span<byte>((void*)destination, take));
        _reader.AdvanceTo(buffer.GetPosition(take));
        return take;
    }

    private static unsafe nint PinnedAddress(byte[] pinned)
    {
        fixed (byte* p = pinned)
            return (nint)p; // allocated on the pinned object heap: the address never moves
    }

    /// <summary>Sends a header and optional native payload. The caller holds <see cref="SendLock"/>.</summary>
    public async ValueTask SendAsync(FrameHeader header, nint payload, int length, CancellationToken ct)
    {
        header.Write(_sendHeader);
        await SendAllAsync(_sendHeader, ct).ConfigureAwait(false);
        if (length > 0)
            await SendAllAsync(_sendPayload.Reset(payload, length), ct).ConfigureAwait(false);
    }

    /// <summary>Sends a header with a managed payload (control frames, injected faults). The caller holds <see cref="SendLock"/>.</summary>
    public async ValueTask SendAsync(FrameHeader header, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        header.Write(_sendHeader);
        await SendAllAsync(_sendHeader, ct).ConfigureAwait(false);
        if (!payload.IsEmpty)
            await SendAllAsync(payload, ct).ConfigureAwait(false);
    }

    private async ValueTask SendAllAsync(ReadOnlyMemory<byte> data, CancellationToken ct)
    {
        while (!data.IsEmpty)
        {
            int n = await _socket.SendAsync(data, SocketFlags.None, ct).ConfigureAwait(false);
            data = data[n..];
        }
    }

    /// <summary>Closes the socket: pending sends and receives fail at once.</summary>
    public void Abort()
    {
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
            // Already reset by the peer.
        }
        catch (ObjectDisposedException)
        {
            return;
        }
        _socket.Dispose();
    }

    public async ValueTask DisposeAsync()
    {
        Abort();
        await _reader.CompleteAsync().ConfigureAwait(false);
        SendLock.Dispose();
    }
}
