using System.Net;

namespace KvFabric.Transfer;

public sealed record TransferAgentOptions
{
    public string Name { get; init; } = "agent";
    /// <summary>Where the TCP backend listens. Loopback by default; bind a NIC address for multi-node use.</summary>
    public IPAddress ListenAddress { get; init; } = IPAddress.Loopback;
    public int ListenPort { get; init; }
    /// <summary>The host peers should dial (defaults to the listen address).</summary>
    public string? AdvertiseHost { get; init; }
    /// <summary>TCP connections a request is striped over by default.</summary>
    public int TcpStreams { get; init; } = 2;
    /// <summary>Copy threads per shared-memory request by default.</summary>
    public int ShmStreams { get; init; } = 1;
    /// <summary>The unit of striping and of checksums; descriptors larger than this are split.</summary>
    public int MaxChunkBytes { get; init; } = 4 << 20;
    public int MaxDescriptors { get; init; } = 1 << 16;
    /// <summary>
    /// Page-locked host slots (MaxChunkBytes each) that device chunks are staged through; a request may hold at most
    /// this many device chunks, and posts wait (up to their deadline) while others hold them. Allocated when the first
    /// device region is registered.
    /// </summary>
    public int DeviceStagingSlots { get; init; } = 16;
    /// <summary>Notifications waiting to be read; when full, senders get a clear QueueFull failure.</summary>
    public int NotificationQueueCapacity { get; init; } = 4096;
    /// <summary>
    /// Bytes of notification messages waiting to be read, at most (at least 1 MiB, the largest notification); beyond
    /// it a notification is refused like one over the count, so a peer cannot park 4096 x 1 MiB here.
    /// </summary>
    public long NotificationQueueBytes { get; init; } = 64L << 20;
    public TimeSpan ConnectTimeout { get; init; } = TimeSpan.FromSeconds(5);
    /// <summary>
    /// Bounds each frame an inbound connection has started: the frame (its payload received, or a READ's reply sent,
    /// and the acknowledgement) must finish within this plus its length at 1 MiB/s, or the connection is closed,
    /// releasing the regions the frame held. Idle time between frames is not a stall.
    /// </summary>
    public TimeSpan StallTimeout { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Inbound connections served at once (each has a receive thread); more are refused.</summary>
    public int MaxInboundConnections { get; init; } = 256;
    /// <summary>The KV layout fingerprint; peers with a different non-empty one are refused at load time.</summary>
    public ReadOnlyMemory<byte> LayoutFingerprint { get; init; }
    /// <summary>
    /// The directory under which a peer's file regions may be mapped for shared-memory transfers. Null (the default):
    /// a peer's file regions are reached over TCP only, so its metadata can never make this process map a file.
    /// </summary>
    public string? SharedFileDirectory { get; init; }
    /// <summary>
    /// Starts a UCX worker (libucp.so.0) and advertises it in the metadata, so peers can use the UCX backend. If libucp
    /// is missing or UCX fails to initialise the agent still works; <see cref="TransferAgent.UcxUnavailableReason"/> says why.
    /// </summary>
    public bool EnableUcx { get; init; }
    /// <summary>
    /// UCX configuration applied on top of the UCX_* environment (ucp_config_modify), names without the prefix:
    /// for example { ["TLS"] = "tcp" } is UCX_TLS=tcp for this agent only.
    /// </summary>
    public IReadOnlyDictionary<string, string>? UcxSettings { get; init; }
    /// <summary>With <see cref="BackendKind.Auto"/>: use UCX for peers that advertise it (instead of shared memory or TCP).</summary>
    public bool PreferUcx { get; init; }
    /// <summary>Fault injection for tests: never set in production.</summary>
    public TransferFaults? Faults { get; init; }
}

/// <summary>Deliberate faults for tests (FASTER's flaky-device idea, for the wire).</summary>
public sealed class TransferFaults
{
    private int _payloads;

    /// <summary>Corrupts one byte of the Nth payload this agent sends or copies (1-based; 0 never).</summary>
    public int CorruptNthPayload { get; init; }

    /// <summary>Runs on a TCP target's session thread before a WRITE's payload is received into its region (tests freeze it there).</summary>
    internal Action? BeforeWriteLands { get; init; }

    internal bool ShouldCorrupt() => CorruptNthPayload > 0 && Interlocked.Increment(ref _payloads) == CorruptNthPayload;

    /// <summary>A copy of the payload with one byte flipped: what a bad NIC or a torn buffer would deliver.</summary>
    internal static unsafe byte[] Corrupted(nint payload, int length)
    {
        byte[] copy = new byte[length];
        new ReadOnlySpan<byte>((void*)payload, length).CopyTo(copy);
        copy[length / 2] ^= 0x5A;
        return copy;
    }
}

/// <summary>Counters of what an agent moved and refused (exported as metrics by the sidecar).</summary>
public sealed class TransferStats
{
    internal long TcpSent, TcpReceived, ShmWritten, ShmRead, Refused, Malformed, Posts, Failures;
    internal long UcxSent, UcxReceived, UcxEps, UcxTcpEps, NotifyRefused;
    /// <summary>Notifications refused on arrival: the queue was full (by count or bytes) or the message was over 1 MiB.</summary>
    public long RefusedNotifications => Interlocked.Read(ref NotifyRefused);
    public long UcxBytesSent => Interlocked.Read(ref UcxSent);
    public long UcxBytesReceived => Interlocked.Read(ref UcxReceived);
    /// <summary>UCX endpoints this agent created to peers.</summary>
    public long UcxEndpoints => Interlocked.Read(ref UcxEps);
    /// <summary>UCX endpoints whose lanes include a tcp transport: a silent fallback from RDMA shows up here.</summary>
    public long UcxTcpEndpoints => Interlocked.Read(ref UcxTcpEps);
    public long TcpBytesSent => Interlocked.Read(ref TcpSent);
    public long TcpBytesReceived => Interlocked.Read(ref TcpReceived);
    public long ShmBytesWritten => Interlocked.Read(ref ShmWritten);
    public long ShmBytesRead => Interlocked.Read(ref ShmRead);
    public long RefusedFrames => Interlocked.Read(ref Refused);
    public long MalformedFrames => Interlocked.Read(ref Malformed);
    public long PostedRequests => Interlocked.Read(ref Posts);
    public long FailedRequests => Interlocked.Read(ref Failures);
}
