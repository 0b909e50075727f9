using System.Net.Sockets;
using KvFabric.Memory;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// The target side of one inbound connection. Every frame is checked against this agent's registry (region, key,
/// bounds) before a byte lands; refused payloads are drained so the stream stays in frame. A WRITE is acknowledged
/// only once its bytes are in registered memory and, if asked, their checksum verified.
/// </summary>
internal sealed class TcpServerSession(TcpBackend backend, Socket socket)
{
    private const int MaxControlPayload = 1 << 20;
    private readonly FrameChannel _channel = new(socket);
    private string _peerName = "?";
    private Guid _peerId;

    public async Task RunAsync(CancellationToken ct)
    {
        try
        {
            var hello = await _channel.ReadHeaderAsync(ct).ConfigureAwait(false);
            if (hello.Type != FrameType.Hello || !await AcceptHelloAsync(hello, ct).ConfigureAwait(false))
                return;
            while (true)
            {
                var h = await _channel.ReadHeaderAsync(ct).ConfigureAwait(false);
                switch (h.Type)
                {
                    case FrameType.Write: await OnWriteAsync(h, ct).ConfigureAwait(false); break;
                    case FrameType.ReadRequest: await OnReadAsync(h, ct).ConfigureAwait(false); break;
                    case FrameType.Notify: await OnNotifyAsync(h, ct).ConfigureAwait(false); break;
                    case FrameType.Fence:
                        await ReplyAsync(new FrameHeader { Type = FrameType.FenceAck, RequestId = h.RequestId }, ct).ConfigureAwait(false);
                        break;
                    default:
                        await FailAsync($"frame type {h.Type} is not valid from an initiator", ct).ConfigureAwait(false);
                        return;
                }
            }
        }
        catch (InvalidDataException e)
        {
            backend.Agent.CountMalformed();
            await FailAsync(e.Message, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is EndOfStreamException or SocketException or IOException or OperationCanceledException or ObjectDisposedException)
        {
            // The initiator went away or we are shutting down; its outstanding requests fail on its side.
        }
        finally
        {
            await _channel.DisposeAsync().ConfigureAwait(false);
        }
    }

    private async Task<bool> AcceptHelloAsync(FrameHeader h, CancellationToken ct)
    {
        if (h.Length is < 32 or > MaxControlPayload)
        {
            await FailAsync($"hello payload of {h.Length} bytes is malformed", ct).ConfigureAwait(false);
            return false;
        }
        byte[] payload = await _channel.ReceiveSmallAsync((int)h.Length, ct).ConfigureAwait(false);
        var target = new Guid(payload.AsSpan(0, 16));
        _peerId = new Guid(payload.AsSpan(16, 16));
        _peerName = System.Text.Encoding.UTF8.GetString(payload.AsSpan(32));
        if (target != backend.Agent.AgentId)
        {
            await FailAsync($"this endpoint is agent '{backend.Agent.Name}' ({backend.Agent.AgentId}), not {target}: the metadata is stale (the agent restarted); reload it", ct).ConfigureAwait(false);
            return false;
        }
        await ReplyAsync(new FrameHeader { Type = FrameType.HelloOk }, ct).ConfigureAwait(false);
        return true;
    }

    private RegisteredRegion? Resolve(in FrameHeader h, out WireStatus status)
    {
        var region = backend.Agent.Registry.ById(h.RegionId);
        if (region is null || !region.TryAcquire())
        {
            status = WireStatus.UnknownRegion;
            return null;
        }
        if (region.Key.Value != h.RegionKey)
            status = WireStatus.KeyMismatch;
        else if (h.Length == 0 || h.Offset > region.Length || h.Length > region.Length - h.Offset)
            status = WireStatus.OutOfRange;
        else if (region.Kind == MemoryKind.Device)
            status = WireStatus.Internal;
        else
        {
            status = WireStatus.Ok;
            return region;
        }
        region.Release();
        return null;
    }

    private async Task OnWriteAsync(FrameHeader h, CancellationToken ct)
    {
        if (h.Length > backend.Agent.Options.MaxChunkBytes)
            throw new InvalidDataException($"a {h.Length}-byte frame exceeds this agent's {backend.Agent.Options.MaxChunkBytes}-byte chunk limit");
        var region = Resolve(h, out var status);
        if (region is null)
        {
            await _channel.DrainAsync((int)h.Length, ct).ConfigureAwait(false);
            backend.Agent.CountRefused();
        }
        else
        {
            try
            {
                nint dest = (nint)(region.Address + h.Offset);
                await _channel.ReceiveAsync(dest, (int)h.Length, ct).ConfigureAwait(false);
                if (h.HasChecksum && Checksums.Compute(h.ChecksumKind, dest, (int)h.Length) != h.Checksum)
                    status = WireStatus.ChecksumMismatch;
                if (region.Kind == MemoryKind.File && status == WireStatus.Ok && region.Memory is MappedMemory file)
                    file.Flush();
                backend.Agent.CountBytes(BackendKind.Tcp, h.Length, received: true);
            }
            finally
            {
                region.Release();
            }
        }
        await ReplyAsync(new FrameHeader { Type = FrameType.WriteAck, RequestId = h.RequestId, Chunk = h.Chunk, Status = status }, ct).ConfigureAwait(false);
    }

    private async Task OnReadAsync(FrameHeader h, CancellationToken ct)
    {
        if (h.Length > backend.Agent.Options.MaxChunkBytes)
            throw new InvalidDataException($"a {h.Length}-byte read exceeds this agent's {backend.Agent.Options.MaxChunkBytes}-byte chunk limit");
        var region = Resolve(h, out var status);
        var reply = new FrameHeader { Type = FrameType.ReadData, RequestId = h.RequestId, Chunk = h.Chunk, Status = status };
        if (region is null)
        {
            backend.Agent.CountRefused();
            await ReplyAsync(reply, ct).ConfigureAwait(false);
            return;
        }
        try
        {
            nint src = (nint)(region.Address + h.Offset);
            reply.Length = h.Length;
            if (h.HasChecksum)
            {
                reply.Flags = FrameHeader.FlagChecksum;
                reply.ChecksumKind = h.ChecksumKind;
                reply.Checksum = Checksums.Compute(h.ChecksumKind, src, (int)h.Length);
            }
            await backend.SendPayloadAsync(_channel, reply, src, ct, holdsLock: false).ConfigureAwait(false);
            backend.Agent.CountBytes(BackendKind.Tcp, h.Length, received: false);
        }
        finally
        {
            region.Release();
        }
    }

    private async Task OnNotifyAsync(FrameHeader h, CancellationToken ct)
    {
        if (h.Length > MaxControlPayload)
            throw new InvalidDataException($"a {h.Length}-byte notification exceeds the {MaxControlPayload}-byte limit");
        byte[] message = h.Length == 0 ? [] : await _channel.ReceiveSmallAsync((int)h.Length, ct).ConfigureAwait(false);
        var status = backend.Agent.Deliver(new Notification(_peerName, _peerId, message)) ? WireStatus.Ok : WireStatus.QueueFull;
        await ReplyAsync(new FrameHeader { Type = FrameType.NotifyAck, RequestId = h.RequestId, Status = status }, ct).ConfigureAwait(false);
    }

    // Only this session's loop sends on its connection, so no lock is needed.
    private ValueTask ReplyAsync(FrameHeader h, CancellationToken ct) => _channel.SendAsync(h, 0, 0, ct);

    private async Task FailAsync(string message, CancellationToken ct)
    {
        try
        {
            byte[] text = System.Text.Encoding.UTF8.GetBytes(message);
            await _channel.SendAsync(new FrameHeader { Type = FrameType.Error, Length = (uint)text.Length }, text, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or IOException or OperationCanceledException or ObjectDisposedException)
        {
            // The connection is going down anyway; the message was a courtesy.
        }
    }
}
