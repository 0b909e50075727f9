using System.Net;
using System.Net.Sockets;
using KvFabric.Transfer.Tcp;

namespace KvFabric.Tests.Transfer;

/// <summary>A hand-driven target: accepts connections in order and speaks the frames the test tells it to.</summary>
internal sealed class FakeTcpTarget : IAsyncDisposable
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly List<TcpClient> _clients = [];

    public FakeTcpTarget() => _listener.Start();

    public int Port => ((IPEndPoint)_listener.LocalEndpoint).Port;

    public async Task<NetworkStream> AcceptAsync(bool answerHello = true)
    {
        var client = await _listener.AcceptTcpClientAsync().WaitAsync(Bound);
        _clients.Add(client);
        var stream = client.GetStream();
        var hello = await ReadAsync(stream);
        await stream.ReadExactlyAsync(new byte[hello.Length]).AsTask().WaitAsync(Bound);
        if (answerHello)
            await SendAsync(stream, new FrameHeader { Type = FrameType.HelloOk });
        return stream;
    }

    public static async Task<FrameHeader> ReadAsync(NetworkStream stream)
    {
        var b = new byte[FrameHeader.Size];
        await stream.ReadExactlyAsync(b).AsTask().WaitAsync(Bound);
        return FrameHeader.Read(b);
    }

    public static async Task SendAsync(NetworkStream stream, FrameHeader h, byte[]? payload = null)
    {
        var b = new byte[FrameHeader.Size];
        h.Write(b);
        await stream.WriteAsync(b);
        if (payload is not null)
            await stream.WriteAsync(payload);
    }

    public static Task ReadDataAsync(NetworkStream stream, FrameHeader request, byte value) =>
        SendAsync(stream, new FrameHeader { Type = FrameType.ReadData, RequestId = request.RequestId, Chunk = request.Chunk, Length = request.Length },
            Enumerable.Repeat(value, (int)request.Length).ToArray());

    public async ValueTask DisposeAsync()
    {
        foreach (var c in _clients)
            c.Dispose();
        _listener.Stop();
        _listener.Dispose();
        await Task.CompletedTask;
    }
}
