using System.Buffers.Binary;
using System.Net.Sockets;
using System.Text;
using Google.Protobuf;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>
/// A client that stops answering (its host froze or a partition black-holes its packets) while a call is open: the
/// server must notice (HTTP/2 keepalive PINGs) and end its calls, or what they hold stays held forever.
/// </summary>
public sealed class DeadPeerTests : IAsyncLifetime
{
    private SidecarHost _host = null!;

    public async Task InitializeAsync()
    {
        _host = new SidecarHost(new SidecarOptions
        {
            Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20, StagingSlots = 1,
            PutStagingBlocks = 1, KeepAlive = TimeSpan.FromSeconds(2),
        }, NullLoggerFactory.Instance);
        await _host.StartAsync();
    }

    public async Task DisposeAsync() => await _host.DisposeAsync();

    /// <summary>Just enough of an HTTP/2 client to open one Put stream by hand; it answers PINGs only while told to.</summary>
    private sealed class RawH2Client : IAsyncDisposable
    {
        private readonly TcpClient _tcp = new();
        private NetworkStream _stream = null!;
        private readonly SemaphoreSlim _write = new(1, 1);
        private Task _reader = Task.CompletedTask;
        public volatile bool AnswerPings = true;
        private readonly System.Collections.Concurrent.ConcurrentDictionary<int, bool> _ended = new();
        private int _nextStream = 1;

        public async Task ConnectAsync(System.Net.IPEndPoint server)
        {
            await _tcp.ConnectAsync(server);
            _stream = _tcp.GetStream();
            await SendAsync(Encoding.ASCII.GetBytes("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"));
            await SendAsync(Frame(4, 0, 0, [])); // SETTINGS, all defaults
            _reader = Task.Run(ReadLoopAsync);
        }

        public bool Ended(int stream) => _ended.ContainsKey(stream);

        /// <summary>Opens a Put stream, sends firstMessage and leaves the stream open; returns the stream's id.</summary>
        public async Task<int> OpenPutAsync(string authority, byte[] firstMessage)
        {
            int stream = Interlocked.Add(ref _nextStream, 2) - 2;
            var headers = new List<byte>();
            foreach (var (name, value) in new[]
            {
                (":method", "POST"), (":scheme", "http"), (":path", "/kvfabric.v1.Fabric/Put"), (":authority", authority),
                ("content-type", "application/grpc"), ("te", "trailers"), ("authorization", "Bearer dev"), ("x-kvfabric-tenant", "dev"),
            })
            {
                headers.Add(0); // literal header field without indexing, new name (HPACK 6.2.2), no Huffman
                headers.Add((byte)name.Length);
                headers.AddRange(Encoding.ASCII.GetBytes(name));
                headers.Add((byte)value.Length);
                headers.AddRange(Encoding.ASCII.GetBytes(value));
            }

            await SendAsync(Frame(1, 0x4, stream, headers.ToArray())); // HEADERS, END_HEADERS; the request stays open
            await SendAsync(Frame(0, 0, stream, firstMessage));         // DATA, no END_STREAM
            return stream;
        }

        private async Task ReadLoopAsync()
        {
            var head = new byte[9];
            try
            {
                while (true)
                {
                    await _stream.ReadExactlyAsync(head);
                    int length = (head[0] << 16) | (head[1] << 8) | head[2];
                    byte[] payload = new byte[length];
                    await _stream.ReadExactlyAsync(payload);
                    int stream = BinaryPrimitives.ReadInt32BigEndian(head.AsSpan(5)) & int.MaxValue;
                    if (head[3] == 3 || (head[3] is 0 or 1 && (head[4] & 1) != 0))
                        _ended[stream] = true; // RST_STREAM, or END_STREAM: the server answered (refused) the call
                    if (head[3] == 4 && (head[4] & 1) == 0)
                        await SendAsync(Frame(4, 1, 0, []));      // SETTINGS ACK
                    else if (head[3] == 6 && (head[4] & 1) == 0 && AnswerPings)
                        await SendAsync(Frame(6, 1, 0, payload)); // PING ACK
                }
            }
            catch (Exception)
            {
                // the server closed the connection
            }
        }

        private async Task SendAsync(byte[] bytes)
        {
            await _write.WaitAsync();
            try
            {
                await _stream.WriteAsync(bytes);
            }
            finally
            {
                _write.Release();
            }
        }

        private static byte[] Frame(byte type, byte flags, int stream, byte[] payload)
        {
            var frame = new byte[9 + payload.Length];
            frame[0] = (byte)(payload.Length >> 16);
            frame[1] = (byte)(payload.Length >> 8);
            frame[2] = (byte)payload.Length;
            frame[3] = type;
            frame[4] = flags;
            BinaryPrimitives.WriteInt32BigEndian(frame.AsSpan(5), stream);
            payload.CopyTo(frame, 9);
            return frame;
        }

        public async ValueTask DisposeAsync()
        {
            _tcp.Dispose();
            await _reader;
        }
    }

    [Fact]
    public async Task A_put_whose_client_stopped_answering_gives_its_staging_back()
    {
        int blockBytes = (int)SidecarFixture.SmallLayout.BlockBytes;
        byte[][] stalled = TestBlocks.Chain("dead-peer-stalled", 1), other = TestBlocks.Chain("dead-peer-other", 1);
        byte[] half = new PutRequest
        {
            Hash = ByteString.CopyFrom(stalled[0]), BlockLength = (ulong)blockBytes, Data = ByteString.CopyFrom(new byte[blockBytes / 2]),
        }.ToByteArray();
        byte[] message = new byte[5 + half.Length];
        BinaryPrimitives.WriteUInt32BigEndian(message.AsSpan(1), (uint)half.Length);
        half.CopyTo(message, 5);

        await using var raw = new RawH2Client();
        await raw.ConnectAsync(_host.GrpcEndpoint!);
        string authority = _host.GrpcEndpoint!.ToString();
        int stream = await raw.OpenPutAsync(authority, message);

        using var client = new FabricClient(new RpcChannelOptions
        {
            Address = new Uri($"http://{_host.GrpcEndpoint}"), Tenant = "dev", Token = "dev", DefaultDeadline = TimeSpan.FromSeconds(20),
        });
        async Task<StatusCode> PutOtherAsync()
        {
            try
            {
                await client.PutAsync(TestBlocks.ToPut(other, blockBytes, 9));
                return StatusCode.OK;
            }
            catch (RpcException e)
            {
                return e.Status;
            }
        }

        // While the client answers PINGs it is alive, only slow: its half-sent block holds the one staging buffer.
        var clock = System.Diagnostics.Stopwatch.StartNew();
        StatusCode status;
        while (true)
        {
            await Task.Delay(50);
            if ((status = await PutOtherAsync()) != StatusCode.OK || clock.Elapsed > TimeSpan.FromSeconds(30))
                break;
            await client.DeleteAsync(TestBlocks.Packed(other)); // it ran before the stalled Put staged its block: again
            if (raw.Ended(stream))
                stream = await raw.OpenPutAsync(authority, message); // the stalled Put found the buffer taken: again
        }

        Assert.Equal(StatusCode.ResourceExhausted, status);

        // It goes silent (no PING answered): the server must drop it and give its staging back.
        raw.AnswerPings = false;
        clock.Restart();
        while ((status = await PutOtherAsync()) != StatusCode.OK && clock.Elapsed < TimeSpan.FromSeconds(60))
            await Task.Delay(200);
        Assert.Equal(StatusCode.OK, status);
    }
}
