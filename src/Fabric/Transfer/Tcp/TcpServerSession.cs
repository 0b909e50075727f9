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
    private readonly FrameChannel _channel = new(socket);
    private Cuda.SessionStaging? _staging; // device regions: their bytes pass through a host buffer on this side
    private string _peerName = "?";
    private Guid _peerId;

    private TransferAgent Agent => backend.Agent;

    public void Abort() => _channel.Abort();

    public void Run()
    {
        try
        {
            _channel.ReceiveTimeout = Agent.Options.ConnectTimeout; // a silent connection may not hold a session thread
            _channel.SendTimeout = Agent.Options.StallTimeout;
            // Nor may a slow one: the receive timeout bounds each receive, this the whole handshake.
            int handshake = 0; // 0 running, 1 done, 2 expired
            using (new Timer(_ =>
            {
                if (Interlocked.CompareExchange(ref handshake, 2, 0) == 0)
                    _channel.Abort();
            }, null, Agent.Options.ConnectTimeout, Timeout.InfiniteTimeSpan))
            {
                var hello = _channel.ReadHeader();
                if (hello.Type != FrameType.Hello || !AcceptHello(hello) || Interlocked.CompareExchange(ref handshake, 1, 0) != 0)
                    return;
            }
            // Idle between frames for as long as the peer likes; inside a frame (its payload received into a region,
            // or a READ's reply sent from one) a stalled peer is dropped, so it cannot hold the region from deregistration.
            _channel.ReceiveTimeout = Agent.Options.StallTimeout;
            while (true)
            {
                var h = _channel.ReadHeader(mayIdle: true);
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
            }
        }
        catch (InvalidDataException e)
        {
            Agent.CountMalformed();
            Fail(e.Message);
        }
        catch (Exception e) when (e is EndOfStreamException or SocketException or IOException or ObjectDisposedException)
        {
            // The initiator went away or we are shutting down; its outstanding requests fail on its side.
        }
        catch (Exception e)
        {
            // Never let one connection take the agent's process down from a raw thread.
            Fail($"the target failed on this connection: {e.Message}");
        }
        finally
        {
            _channel.Dispose();
            _staging?.Dispose();
        }
    }

    private bool AcceptHello(FrameHeader h)
    {
        if (h.Length is < 32 or > MaxControlPayload)
            throw new InvalidDataException($"hello payload of {h.Length} bytes is malformed");
        byte[] payload = _channel.ReceiveSmall((int)h.Length);
        var target = new Guid(payload.AsSpan(0, 16));
        _peerId = new Guid(payload.AsSpan(16, 16));
        _peerName = System.Text.Encoding.UTF8.GetString(payload.AsSpan(32));
        if (target != Agent.AgentId)
        {
            Fail($"this endpoint is agent '{Agent.Name}' ({Agent.AgentId}), not {target}: the metadata is stale (the agent restarted); reload it");
            return false;
        }
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
