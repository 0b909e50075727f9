using System.Net.Sockets;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// One TCP connection's framing, shared by both ends. The receive side runs on the connection's own thread with
/// blocking receives: on this 2-core machine an async receive loop cost twice the CPU per GB of a blocking one
/// (0.33-0.36 vs 0.16 CPU-s/GB, docs/transfer.md), and the receiver is the bottleneck of a loopback transfer. Headers are
/// parsed from a small buffer, so frames survive any split of the byte stream; a payload's first bytes may sit in that
/// buffer and are copied out, the rest is received straight into registered memory. Sends go straight from registered
/// memory, from the one thread that sends on the connection. The socket never runs an async operation, so it stays
/// in the kernel's blocking mode and a blocked sender is woken by the kernel directly.
/// </summary>
internal sealed class FrameChannel : IDisposable
{
    private const int InBufferBytes = 4096;
    private readonly Socket _socket;
    private readonly byte[] _in = GC.AllocateUninitializedArray<byte>(InBufferBytes, pinned: true);
    private int _inStart, _inEnd;
    private readonly byte[] _sendHeader = GC.AllocateArray<byte>(FrameHeader.Size, pinned: true);
    private byte[]? _drain;
    private int _aborted;

    public FrameChannel(Socket socket)
    {
        _socket = socket;
        _socket.NoDelay = true;
    }

    /// <summary>Bounds blocking receives (the handshake); zero waits until data or abort.</summary>
    public TimeSpan ReceiveTimeout
    {
        set => _socket.ReceiveTimeout = (int)value.TotalMilliseconds;
    }

    /// <summary>Bounds blocking sends: a peer that takes none of our bytes for this long fails the send.</summary>
    public TimeSpan SendTimeout
    {
        set => _socket.SendTimeout = (int)value.TotalMilliseconds;
    }

    /// <summary>
    /// Reads the next header. With <paramref name="mayIdle"/>, a receive timeout before any byte of it arrived is idle
    /// time between frames and the wait goes on; once the header has started, a timeout is a stall and throws.
    /// </summary>
    public FrameHeader ReadHeader(bool mayIdle = false)
    {
        while (_inEnd - _inStart < FrameHeader.Size)
            Fill(mayIdle);
        var header = FrameHeader.Read(_in.AsSpan(_inStart, FrameHeader.Size));
        _inStart += FrameHeader.Size;
        return header;
    }

    private void Fill(bool mayIdle)
    {
        if (_inStart > 0)
        {
            _in.AsSpan(_inStart, _inEnd - _inStart).CopyTo(_in);
            _inEnd -= _inStart;
            _inStart = 0;
        }
        int n;
        try
        {
            n = _socket.Receive(_in.AsSpan(_inEnd));
        }
        catch (SocketException e) when (mayIdle && _inEnd == 0 && e.SocketErrorCode is SocketError.TimedOut or SocketError.WouldBlock)
        {
            return; // idle between frames
        }
        if (n == 0)
        {
            throw new EndOfStreamException(_inEnd == 0
                ? "the peer closed the connection"
                : $"the peer closed the connection inside a frame header ({_inEnd} of {FrameHeader.Size} bytes)");
        }
        _inEnd += n;
    }

    /// <summary>Receives exactly <paramref name="length"/> payload bytes into native memory at <paramref name="destination"/>.</summary>
    public unsafe void Receive(nint destination, int length)
    {
        int got = Math.Min(length, _inEnd - _inStart);
        _in.AsSpan(_inStart, got).CopyTo(new Span<byte>((void*)destination, got));
        _inStart += got;
        while (got < length)
        {
            int n = _socket.Receive(new Span<byte>((byte*)destination + got, length - got));
            if (n == 0)
                throw new EndOfStreamException($"the peer closed the connection after {got} of {length} payload bytes");
            got += n;
        }
    }

    /// <summary>Receives a small control payload (hello, notification, error text) into a new array.</summary>
    public byte[] ReceiveSmall(int length)
    {
        byte[] data = GC.AllocateUninitializedArray<byte>(length, pinned: true);
        Receive(PinnedAddress(data), length);
        return data;
    }

    /// <summary>Reads and discards a payload that was refused, so the stream stays in frame.</summary>
    public void Drain(int length)
    {
        _drain ??= GC.AllocateUninitializedArray<byte>(64 * 1024, pinned: true);
        while (length > 0)
        {
            int n = Math.Min(length, _drain.Length);
            Receive(PinnedAddress(_drain), n);
            length -= n;
        }
    }

    private static unsafe nint PinnedAddress(byte[] pinned)
    {
        fixed (byte* p = pinned)
            return (nint)p; // allocated on the pinned object heap: the address never moves
    }

    /// <summary>Sends a frame. Each connection has exactly one sending thread (a target session's, or an initiator's transmit thread).</summary>
    public unsafe void Send(FrameHeader header, nint payload, int length) =>
        Send(header, new ReadOnlySpan<byte>((void*)payload, length));

    public void Send(FrameHeader header, ReadOnlySpan<byte> payload)
    {
        header.Write(_sendHeader);
        SendAll(_sendHeader);
        SendAll(payload);
    }

    private void SendAll(ReadOnlySpan<byte> data)
    {
        while (!data.IsEmpty)
            data = data[_socket.Send(data)..];
    }

    /// <summary>Closes the socket: blocked receives and pending sends fail at once.</summary>
    public void Abort()
    {
        if (Interlocked.Exchange(ref _aborted, 1) != 0)
            return;
        try
        {
            _socket.Shutdown(SocketShutdown.Both);
        }
        catch (SocketException)
        {
            // Already reset by the peer.
        }
        _socket.Dispose();
    }

    public void Dispose() => Abort();
}
