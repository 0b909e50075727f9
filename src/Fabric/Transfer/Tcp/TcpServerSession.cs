using System.Diagnostics;
using System.Net.Sockets;
using KvFabric.Memory;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// The target side of one inbound connection, on its own thread. Every frame is checked against this agent's registry
/// (region, key, bounds) before a byte lands; refused payloads are drained so the stream stays in frame. A WRITE is
/// acknowledged only once its bytes are in registered memory and, if asked, their checksum verified.
/// </summary>
internal sealed class TcpServerSession(TcpBackend backend, Socket socket)
{
    private const int MaxControlPayload = 1 << 20;

    /// <summary>
    /// The slowest a frame's payload may move once it started: a frame must finish within StallTimeout plus its length
    /// at this rate. 1 MiB/s (8 Mbit/s) is far below what a congested data-centre link gives one connection, so it never
    /// cuts off a live transfer that StallTimeout alone would not; for the default 4 MiB chunk it adds 4 s to the 30 s
    /// StallTimeout, and it keeps a large MaxChunkBytes from being cut off merely for its size.
    /// </summary>
    internal const long MinFrameBytesPerSecond = 1 << 20;

    /// <summary>The longest initiator name a HELLO carries (initiators cut longer ones at a character boundary).</summary>
    internal const int MaxHelloNameBytes = 1024;

    private readonly FrameChannel _channel = new(socket);
    private Cuda.SessionStaging? _staging; // device regions: their bytes pass through a host buffer on this side
    private string _peerName = "?";
    private Guid _peerId;
    // One timer per session, re-armed per frame (no allocation per frame): it aborts the connection when the handshake or
    // the frame in progress outlives its deadline. Socket timeouts bound each receive or send, not a frame: a peer that
    // trickles a byte now and then would never trip them.
    private Timer? _timer;
    private long _deadlineAt = long.MaxValue; // Stopwatch timestamp; MaxValue when no deadline is armed
    private volatile bool _expired;
    private FrameType _frameType;
    private uint _frameLength;

    private TransferAgent Agent => backend.Agent;

    // Who this connection is, from its HELLO: an initiator's stream in one of its connection sets (Stream -1: an
    // initiator that does not say). Identified once past the supersede step, just before HELLO_OK.
    internal Guid PeerId => _peerId;
    internal ulong ConnectionSet { get; private set; }
    internal int Stream { get; private set; } = -1;
    internal volatile bool Identified;

    public void Abort() => _channel.Abort();

    public void Run()
    {
        try
        {
            _timer = new Timer(OnDeadline);
            _channel.ReceiveTimeout = Agent.Options.ConnectTimeout; // a silent connection may not hold a session thread
            _channel.SendTimeout = Agent.Options.StallTimeout;
            // Nor may a slow one: the receive timeout bounds each receive, the deadline the whole handshake.
            Arm(FrameType.Hello, 0, Agent.Options.ConnectTimeout);
            var hello = _channel.ReadHeader();
            if (hello.Type != FrameType.Hello || !AcceptHello(hello))
                return;
            Disarm();
            if (_expired)
                return;
            // Idle between frames for as long as the peer likes; inside a frame (its payload received into a region,
            // or a READ's reply sent from one) the frame has a deadline, so a stalled or trickling peer is dropped and
            // cannot hold the region from deregistration. The receive timeout still ends a header that stops coming.
            _channel.ReceiveTimeout = Agent.Options.StallTimeout;
            while (true)
            {
                var h = _channel.ReadHeader(mayIdle: true);
                Arm(h.Type, h.Type is FrameType.Write or FrameType.ReadRequest or FrameType.Notify ? h.Length : 0, Agent.Options.StallTimeout);
                switch (h.Type)
                {
                    case FrameType.Write: OnWrite(h); break;
                    case FrameType.ReadRequest: OnRead(h); break;
                    case FrameType.Notify: OnNotify(h); break;
                    case FrameType.Fence:
                        Reply(new FrameHeader { Type = FrameType.FenceAck, RequestId = h.RequestId });
                        break;
                    default:
                        throw new InvalidDataException($"frame type {h.Type} is not valid from an initiator");
                }
                Disarm();
            }
        }
        catch (InvalidDataException e)
        {
            Agent.CountMalformed();
            Fail(e.Message);
        }
        catch (Exception e) when (e is EndOfStreamException or SocketException or IOException or ObjectDisposedException)
        {
            // The initiator went away, we are shutting down, or a deadline closed the connection; its outstanding
            // requests fail on its side.
            if (_expired)
            {
                Console.Error.WriteLine(_frameType == FrameType.Hello
                    ? $"kvfabric: agent '{Agent.Name}': closed an inbound connection whose handshake did not finish within {Agent.Options.ConnectTimeout.TotalSeconds:0.#} s"
                    : $"kvfabric: agent '{Agent.Name}': closed the connection from '{_peerName}': a {_frameType} frame of {_frameLength} bytes did not finish within {FrameDeadline(_frameLength, Agent.Options.StallTimeout).TotalSeconds:0.#} s (StallTimeout plus {MinFrameBytesPerSecond >> 20} MiB/s)");
            }
        }
        catch (Exception e)
        {
            // Never let one connection take the agent's process down from a raw thread.
            Fail($"the target failed on this connection: {e.Message}");
        }
        finally
        {
            _timer?.Dispose();
            _channel.Dispose();
            _staging?.Dispose();
        }
    }

    internal static TimeSpan FrameDeadline(uint length, TimeSpan stallTimeout) =>
        stallTimeout + TimeSpan.FromSeconds((double)length / MinFrameBytesPerSecond);

    private void Arm(FrameType type, uint length, TimeSpan baseline)
    {
        _frameType = type;
        _frameLength = length;
        TimeSpan span = type == FrameType.Hello ? baseline : FrameDeadline(length, baseline);
        long ms = Math.Clamp((long)Math.Ceiling(span.TotalMilliseconds), 1, 0xFFFF_FFFEL);
        Volatile.Write(ref _deadlineAt, Stopwatch.GetTimestamp() + ms * Stopwatch.Frequency / 1000);
        _timer!.Change(ms, Timeout.Infinite);
    }

    private void Disarm()
    {
        Volatile.Write(ref _deadlineAt, long.MaxValue);
        _timer!.Change(Timeout.Infinite, Timeout.Infinite);
    }

    /// <summary>Time left before the armed deadline (zero if it passed).</summary>
    private TimeSpan Remaining()
    {
        long left = Volatile.Read(ref _deadlineAt) - Stopwatch.GetTimestamp();
        return left <= 0 ? TimeSpan.Zero : TimeSpan.FromSeconds((double)left / Stopwatch.Frequency);
    }

    private void OnDeadline(object? state)
    {
        long deadline = Volatile.Read(ref _deadlineAt);
        if (deadline == long.MaxValue)
            return; // disarmed: the frame finished
        long early = deadline - Stopwatch.GetTimestamp();
        if (early > 0)
        {
            // The timer runs on a coarser clock and may fire a little early; or this firing was meant for an earlier
            // frame and the timer was re-armed since. Wait for the rest (a re-arm racing this one corrects itself the
            // same way, and one after a disarm finds no deadline).
            try
            {
                _timer?.Change(Math.Max(1, early * 1000 / Stopwatch.Frequency + 1), Timeout.Infinite);
            }
            catch (ObjectDisposedException)
            {
                // The session ended meanwhile.
            }
            return;
        }
        _expired = true;
        _channel.Abort(); // the session thread's receive or send fails at once; its finally releases the region
    }

    private bool AcceptHello(FrameHeader h)
    {
        // Checked before anything is allocated: the peer is not known yet, and 256 connections announcing 1 MiB each
        // would otherwise cost 256 MiB before one of them was checked.
        if (h.Length is < 32 or > 32 + MaxHelloNameBytes)
            throw new InvalidDataException($"a HELLO payload of {h.Length} bytes is malformed: it is two agent ids (32 bytes) and a name of at most {MaxHelloNameBytes} UTF-8 bytes");
        byte[] payload = _channel.ReceiveSmall((int)h.Length);
        var target = new Guid(payload.AsSpan(0, 16));
        _peerId = new Guid(payload.AsSpan(16, 16));
        _peerName = System.Text.Encoding.UTF8.GetString(payload.AsSpan(32));
        if (target != Agent.AgentId)
        {
            Fail($"this endpoint is agent '{Agent.Name}' ({Agent.AgentId}), not {target}: the metadata is stale (the agent restarted); reload it");
            return false;
        }
        if ((h.Flags & FrameHeader.FlagStreams) != 0)
        {
            if (h.Chunk >= 32)
                throw new InvalidDataException($"a HELLO names stream {h.Chunk}; streams are numbered below 32");
            ConnectionSet = h.RegionKey;
            Stream = (int)h.Chunk;
            // This stream's older connection, and those the initiator abandoned, may still hold bytes of WRITEs that
            // timed out on its side: stop their sessions before this connection can carry a WRITE that they could land over.
            if (backend.StopSuperseded(this, h.Aux | (1u << Stream), Remaining()) is { } busy)
            {
                Fail($"{busy} of this initiator's older connections to agent '{Agent.Name}' did not stop in time: try again");
                return false;
            }
        }
        Identified = true;
        Reply(new FrameHeader { Type = FrameType.HelloOk });
        return true;
    }

    private RegisteredRegion? Resolve(in FrameHeader h, out WireStatus status)
    {
        if (h.Length > Agent.Options.MaxChunkBytes)
            throw new InvalidDataException($"a {h.Length}-byte {h.Type} exceeds this agent's {Agent.Options.MaxChunkBytes}-byte chunk limit");
        var region = Agent.Registry.ById(h.RegionId);
        if (region is null || region.Internal || !region.TryAcquire())
        {
            status = WireStatus.UnknownRegion;
            return null;
        }
        if (region.Key.Value != h.RegionKey)
            status = WireStatus.KeyMismatch;
        else if (h.HasChecksum && !Checksums.IsAvailable(h.ChecksumKind))
            status = WireStatus.ChecksumUnsupported;
        else if (h.Length == 0 || h.Offset > region.Length || h.Length > region.Length - h.Offset)
            status = WireStatus.OutOfRange;
        else
        {
            status = WireStatus.Ok;
            return region;
        }
        region.Release();
        return null;
    }

    private void OnWrite(FrameHeader h)
    {
        var region = Resolve(h, out var status);
        if (region is null)
        {
            _channel.Drain((int)h.Length);
            Agent.CountRefused();
        }
        else
        {
            try
            {
                // Device memory is not addressable here: land in the host buffer, verify there, then copy to the device.
                nint dest = region.Device is { } device ? DeviceBuffer(device) : (nint)(region.Address + h.Offset);
                if (dest == 0)
                {
                    _channel.Drain((int)h.Length);
                    status = WireStatus.Internal;
                }
                else
                {
                    Agent.Options.Faults?.BeforeWriteLands?.Invoke();
                    _channel.Receive(dest, (int)h.Length);
                    if (h.HasChecksum && Checksums.Compute(h.ChecksumKind, dest, (int)h.Length) != h.Checksum)
                        status = WireStatus.ChecksumMismatch;
                    else if (region.Device is { } d && !TryDeviceCopy(d, region.Address + h.Offset - (ulong)d.Buffer.Pointer, dest, (int)h.Length, toDevice: true))
                        status = WireStatus.Internal;
                }
                if (region.Kind == MemoryKind.File && status == WireStatus.Ok && region.Memory is MappedMemory file)
                    file.Flush();
                Agent.CountBytes(BackendKind.Tcp, h.Length, received: true);
            }
            finally
            {
                region.Release();
            }
        }
        Reply(new FrameHeader { Type = FrameType.WriteAck, RequestId = h.RequestId, Chunk = h.Chunk, Status = status });
    }

    private void OnRead(FrameHeader h)
    {
        var region = Resolve(h, out var status);
        var reply = new FrameHeader { Type = FrameType.ReadData, RequestId = h.RequestId, Chunk = h.Chunk, Status = status };
        if (region is null)
        {
            Agent.CountRefused();
            Reply(reply);
            return;
        }
        try
        {
            nint src = (nint)(region.Address + h.Offset);
            if (region.Device is { } device)
            {
                src = DeviceBuffer(device);
                if (src == 0 || !TryDeviceCopy(device, region.Address + h.Offset - (ulong)device.Buffer.Pointer, src, (int)h.Length, toDevice: false))
                {
                    reply.Status = WireStatus.Internal;
                    Reply(reply);
                    return;
                }
            }
            reply.Length = h.Length;
            if (h.HasChecksum)
            {
                reply.Flags = FrameHeader.FlagChecksum;
                reply.ChecksumKind = h.ChecksumKind;
                reply.Checksum = Checksums.Compute(h.ChecksumKind, src, (int)h.Length);
            }
            if (Agent.Options.Faults?.ShouldCorrupt() == true)
                _channel.Send(reply, TransferFaults.Corrupted(src, (int)h.Length));
            else
                _channel.Send(reply, src, (int)h.Length);
            Agent.CountBytes(BackendKind.Tcp, h.Length, received: false);
        }
        finally
        {
            region.Release();
        }
    }

    private Cuda.SessionStaging Staging => _staging ??= new Cuda.SessionStaging(Agent.Options.MaxChunkBytes);

    // The host buffer for a device region's bytes, or 0 when the device refused (logged; the frame is answered Internal).
    private nint DeviceBuffer(Cuda.DeviceRegion device)
    {
        try
        {
            return Staging.Buffer(device.Device);
        }
        catch (Exception e) when (e is KvFabric.Memory.Device.DeviceMemoryException or ArgumentException or ObjectDisposedException)
        {
            DeviceFailed(e);
            return 0;
        }
    }

    private bool TryDeviceCopy(Cuda.DeviceRegion device, ulong offset, nint host, int length, bool toDevice)
    {
        try
        {
            if (toDevice)
                Staging.ToDevice(device, offset, host, length);
            else
                Staging.ToHost(device, offset, host, length);
            return true;
        }
        catch (Exception e) when (e is KvFabric.Memory.Device.DeviceMemoryException or ArgumentException or ObjectDisposedException)
        {
            DeviceFailed(e);
            return false;
        }
    }

    private void DeviceFailed(Exception e) =>
        Console.Error.WriteLine($"kvfabric: agent '{Agent.Name}': a device copy for '{_peerName}' failed: {e.Message}");

    private void OnNotify(FrameHeader h)
    {
        if (h.Length > MaxControlPayload)
            throw new InvalidDataException($"a {h.Length}-byte notification exceeds the {MaxControlPayload}-byte limit");
        byte[] message = h.Length == 0 ? [] : _channel.ReceiveSmall((int)h.Length);
        var status = Agent.Deliver(new Notification(_peerName, _peerId, message)) ? WireStatus.Ok : WireStatus.QueueFull;
        Reply(new FrameHeader { Type = FrameType.NotifyAck, RequestId = h.RequestId, Status = status });
    }

    // Only this session's thread sends on its connection, so no lock is needed.
    private void Reply(FrameHeader h) => _channel.Send(h, ReadOnlySpan<byte>.Empty);

    private void Fail(string message)
    {
        try
        {
            byte[] text = System.Text.Encoding.UTF8.GetBytes(message);
            _channel.Send(new FrameHeader { Type = FrameType.Error, Length = (uint)text.Length }, text);
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
        {
            // The connection is going down anyway; the message was a courtesy.
        }
    }
}
