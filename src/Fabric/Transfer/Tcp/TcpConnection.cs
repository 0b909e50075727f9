using System.Net.Sockets;
using System.Text;

namespace KvFabric.Transfer.Tcp;

/// <summary>
/// The initiator side of one connection to a peer: sends WRITE/READ_REQ frames for its stripe of chunks and a
/// receive loop that settles chunks from acknowledgements and lands READ_DATA payloads directly in local memory.
/// When the connection breaks, every chunk still waiting on it fails at once with the reason.
/// </summary>
internal sealed class TcpConnection
{
    private readonly TcpPeer _peer;
    private readonly FrameChannel _channel;
    private readonly CancellationTokenSource _life = new();
    private Task _receiveLoop = Task.CompletedTask;
    private volatile string? _fault;

    private TcpConnection(TcpPeer peer, int index, Socket socket)
    {
        _peer = peer;
        Index = index;
        _channel = new FrameChannel(socket);
    }

    public int Index { get; }
    public bool IsHealthy => _fault is null;
    public string? Fault => _fault;

    public static async Task<TcpConnection> ConnectAsync(TcpPeer peer, int index, CancellationToken ct)
    {
        var md = peer.Remote.Metadata;
        var socket = new Socket(SocketType.Stream, ProtocolType.Tcp);
        try
        {
            await socket.ConnectAsync(md.TcpHost, md.TcpPort, ct).ConfigureAwait(false);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
        var conn = new TcpConnection(peer, index, socket);
        try
        {
            var agent = peer.Backend.Agent;
            byte[] name = Encoding.UTF8.GetBytes(agent.Name);
            byte[] hello = new byte[32 + name.Length];
            md.AgentId.TryWriteBytes(hello.AsSpan(0, 16));
            agent.AgentId.TryWriteBytes(hello.AsSpan(16, 16));
            name.CopyTo(hello, 32);
            await conn._channel.SendAsync(new FrameHeader { Type = FrameType.Hello, Length = (uint)hello.Length }, hello, ct).ConfigureAwait(false);
            var reply = await conn._channel.ReadHeaderAsync(ct).ConfigureAwait(false);
            if (reply.Type == FrameType.Error)
                throw new TransferException($"agent '{md.Name}' refused the connection: {await conn.ReadErrorAsync(reply, ct).ConfigureAwait(false)}");
            if (reply.Type != FrameType.HelloOk)
                throw new InvalidDataException($"expected HELLO_OK from '{md.Name}', got {reply.Type}");
        }
        catch
        {
            await conn._channel.DisposeAsync().ConfigureAwait(false);
            throw;
        }
        conn._receiveLoop = Task.Run(conn.ReceiveLoopAsync, CancellationToken.None);
        return conn;
    }

    /// <summary>Sends this connection's stripe of a request: chunks i with i % streams == Index.</summary>
    public async Task SendStripeAsync(TransferRequest request, int streams, CancellationToken ct)
    {
        var chunks = request.Chunks;
        var regions = request.Remote.Metadata.Regions;
        var checksum = request.Options.Checksum;
        for (int i = Index; i < chunks.Length; i += streams)
        {
            if (request.IsSettled(i))
                continue;
            if (_fault is { } fault)
            {
                request.Settle(i, DescriptorStatus.PeerDisconnected, fault);
                continue;
            }
            var c = chunks[i];
            var region = regions[c.RemoteRegion];
            var h = new FrameHeader
            {
                Type = request.Op == TransferOp.Write ? FrameType.Write : FrameType.ReadRequest,
                RequestId = request.PostId,
                Chunk = (uint)i,
                RegionId = region.Id,
                RegionKey = region.Key.Value,
                Offset = c.RemoteOffset,
                Length = (uint)c.Length,
            };
            if (checksum != ChecksumKind.None)
            {
                h.Flags = FrameHeader.FlagChecksum;
                h.ChecksumKind = checksum;
                if (request.Op == TransferOp.Write)
                    h.Checksum = Checksums.Compute(checksum, c.Local, c.Length);
            }
            try
            {
                await _channel.SendLock.WaitAsync(ct).ConfigureAwait(false);
                try
                {
                    if (request.Op == TransferOp.Write)
                    {
                        await _peer.Backend.SendPayloadAsync(_channel, h, c.Local, ct, holdsLock: true).ConfigureAwait(false);
                        _peer.Backend.Agent.CountBytes(BackendKind.Tcp, (uint)c.Length, received: false);
                    }
                    else
                        await _channel.SendAsync(h, 0, 0, ct).ConfigureAwait(false);
                }
                finally
                {
                    _channel.SendLock.Release();
                }
            }
            catch (OperationCanceledException)
            {
                return; // deadline or cancel: the agent settles what is left
            }
            catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
            {
                Break($"sending to '{_peer.Remote.Name}' failed: {e.Message}");
                request.Settle(i, DescriptorStatus.PeerDisconnected, _fault);
            }
        }
    }

    /// <summary>Sends a control frame (notification, fence) and waits for its acknowledgement.</summary>
    public async Task<(WireStatus Status, string? Error)> ControlAsync(FrameType type, ReadOnlyMemory<byte> payload, CancellationToken ct)
    {
        var (id, pending) = _peer.NewControl(Index);
        try
        {
            await _channel.SendLock.WaitAsync(ct).ConfigureAwait(false);
            try
            {
                await _channel.SendAsync(new FrameHeader { Type = type, RequestId = id, Length = (uint)payload.Length }, payload, ct).ConfigureAwait(false);
            }
            finally
            {
                _channel.SendLock.Release();
            }
            return await pending.Task.WaitAsync(ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is SocketException or IOException or ObjectDisposedException)
        {
            Break($"sending to '{_peer.Remote.Name}' failed: {e.Message}");
            return (WireStatus.Internal, _fault);
        }
        finally
        {
            _peer.EndControl(id);
        }
    }

    private async Task ReceiveLoopAsync()
    {
        string reason;
        try
        {
            while (true)
            {
                var h = await _channel.ReadHeaderAsync(_life.Token).ConfigureAwait(false);
                switch (h.Type)
                {
                    case FrameType.WriteAck:
                        _peer.FindRequest(h.RequestId)?.Settle((int)h.Chunk, Map(h.Status), FrameHeader.Describe(h.Status));
                        break;
                    case FrameType.ReadData:
                        await OnReadDataAsync(h).ConfigureAwait(false);
                        break;
                    case FrameType.NotifyAck:
                    case FrameType.FenceAck:
                        _peer.CompleteControl(h.RequestId, h.Status);
                        break;
                    case FrameType.Error:
                        reason = $"agent '{_peer.Remote.Name}' closed the connection: {await ReadErrorAsync(h, _life.Token).ConfigureAwait(false)}";
                        Break(reason);
                        return;
                    default:
                        throw new InvalidDataException($"unexpected frame {h.Type} from the target");
                }
            }
        }
        catch (OperationCanceledException)
        {
            reason = $"connection to '{_peer.Remote.Name}' was aborted";
        }
        catch (Exception e) when (e is EndOfStreamException or SocketException or IOException or ObjectDisposedException or InvalidDataException)
        {
            reason = $"connection to '{_peer.Remote.Name}' lost: {e.Message}";
        }
        Break(reason);
    }

    private async ValueTask OnReadDataAsync(FrameHeader h)
    {
        var request = _peer.FindRequest(h.RequestId);
        if (request is null || h.Chunk >= (uint)request.Chunks.Length || request.IsSettled((int)h.Chunk))
        {
            // A reply to a post that already ended (timed out, cancelled): keep the stream in frame, touch nothing.
            await _channel.DrainAsync((int)h.Length, _life.Token).ConfigureAwait(false);
            return;
        }
        var c = request.Chunks[h.Chunk];
        if (h.Status != WireStatus.Ok)
        {
            await _channel.DrainAsync((int)h.Length, _life.Token).ConfigureAwait(false);
            request.Settle((int)h.Chunk, Map(h.Status), FrameHeader.Describe(h.Status));
            return;
        }
        if (h.Length != (uint)c.Length)
            throw new InvalidDataException($"READ_DATA for chunk {h.Chunk} carries {h.Length} bytes, {c.Length} were asked for");
        await _channel.ReceiveAsync(c.Local, c.Length, _life.Token).ConfigureAwait(false);
        _peer.Backend.Agent.CountBytes(BackendKind.Tcp, (uint)c.Length, received: true);
        if (h.HasChecksum && Checksums.Compute(h.ChecksumKind, c.Local, c.Length) != h.Checksum)
            request.Settle((int)h.Chunk, DescriptorStatus.ChecksumMismatch, FrameHeader.Describe(WireStatus.ChecksumMismatch));
        else
            request.Settle((int)h.Chunk, DescriptorStatus.Done);
    }

    private async ValueTask<string> ReadErrorAsync(FrameHeader h, CancellationToken ct)
    {
        if (h.Length is 0 or > 64 * 1024)
            return "(no reason given)";
        return Encoding.UTF8.GetString(await _channel.ReceiveSmallAsync((int)h.Length, ct).ConfigureAwait(false));
    }

    private static DescriptorStatus Map(WireStatus s) => s switch
    {
        WireStatus.Ok => DescriptorStatus.Done,
        WireStatus.UnknownRegion or WireStatus.KeyMismatch or WireStatus.OutOfRange => DescriptorStatus.Refused,
        WireStatus.ChecksumMismatch => DescriptorStatus.ChecksumMismatch,
        _ => DescriptorStatus.Failed,
    };

    /// <summary>Marks the connection broken and fails everything that was waiting on it.</summary>
    private void Break(string reason)
    {
        if (Interlocked.CompareExchange(ref _fault, reason, null) != null)
            return;
        _channel.Abort();
        _peer.OnConnectionBroken(this, reason);
    }

    /// <summary>Closes the socket and waits until the receive loop can no longer write into local memory.</summary>
    public async Task AbortAsync(string reason)
    {
        Break(reason);
        await _life.CancelAsync().ConfigureAwait(false);
        await _receiveLoop.ConfigureAwait(false);
        await _channel.DisposeAsync().ConfigureAwait(false);
    }
}
