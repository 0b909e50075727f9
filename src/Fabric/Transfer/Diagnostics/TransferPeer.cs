using System.Globalization;
using KvFabric.Memory;
using KvFabric.Transfer.Ucx;

namespace KvFabric.Transfer.Diagnostics;

public sealed record TransferPeerOptions
{
    public string Name { get; init; } = "peer";
    public long RegionBytes { get; init; } = 64L << 20;
    /// <summary>Put the region in a /dev/shm segment (reachable over shared memory) instead of private memory.</summary>
    public bool Shared { get; init; }
    public System.Net.IPAddress Listen { get; init; } = System.Net.IPAddress.Loopback;
    public int Port { get; init; }
    public int CorruptNthPayload { get; init; }
    /// <summary>Start a UCX worker too (the agent's metadata then carries its address and rkeys).</summary>
    public bool Ucx { get; init; }
    /// <summary>Let UCX allocate the region (<see cref="TransferAgent.AllocateUcx"/>); needs <see cref="Ucx"/>.</summary>
    public bool UcxAllocate { get; init; }
}

/// <summary>
/// A standalone transfer agent with one registered region, driven by a line protocol on stdin/stdout (the target side
/// of `kvfabric-bench transfer` and of the multi-process tests; like ucx_perftest's server). Protocol in docs/transfer.md.
/// </summary>
public sealed class TransferPeer : IAsyncDisposable
{
    private readonly TransferAgent _agent;
    private INativeMemory _memory;
    private RegisteredRegion _region;

    public TransferPeer(TransferPeerOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        if (options.UcxAllocate && (!options.Ucx || options.Shared))
            throw new ArgumentException("--ucx-alloc needs --ucx and cannot be combined with --shm");
        _agent = new TransferAgent(new TransferAgentOptions
        {
            Name = options.Name,
            ListenAddress = options.Listen,
            ListenPort = options.Port,
            Faults = options.CorruptNthPayload > 0 ? new TransferFaults { CorruptNthPayload = options.CorruptNthPayload } : null,
            EnableUcx = options.Ucx,
        });
        if (options.Ucx && !_agent.UcxAvailable)
            throw new TransferException($"--ucx was given but UCX is not available: {_agent.UcxUnavailableReason}");
        (_memory, _region) = Allocate(options);
    }

    private (INativeMemory, RegisteredRegion) Allocate(TransferPeerOptions options)
    {
        if (options.UcxAllocate)
        {
            var ucx = _agent.AllocateUcx(options.RegionBytes);
            return (ucx, ucx.Region);
        }
        INativeMemory memory = options.Shared ? SharedMemorySegment.Create(options.RegionBytes, "peer") : new AnonymousMemory(options.RegionBytes);
        return (memory, _agent.Register(memory));
    }

    private string Ready() => "READY " + Convert.ToBase64String(_agent.ExportMetadata()) + " " + _region.Address.ToString(CultureInfo.InvariantCulture);

    public async Task<int> RunAsync(TextReader input, TextWriter output)
    {
        ArgumentNullException.ThrowIfNull(input);
        ArgumentNullException.ThrowIfNull(output);
        await output.WriteLineAsync(Ready()).ConfigureAwait(false);
        await output.FlushAsync().ConfigureAwait(false);
        while (await input.ReadLineAsync().ConfigureAwait(false) is { } line)
        {
            string reply;
            try
            {
                reply = await ExecuteAsync(line.Split(' ', StringSplitOptions.RemoveEmptyEntries)).ConfigureAwait(false);
            }
            catch (Exception e) when (e is FormatException or ArgumentException or IndexOutOfRangeException or TransferException or OverflowException)
            {
                reply = "ERROR " + e.Message.ReplaceLineEndings(" ");
            }
            if (reply == "BYE")
                return 0;
            await output.WriteLineAsync(reply).ConfigureAwait(false);
            await output.FlushAsync().ConfigureAwait(false);
        }
        return 0;
    }

    private unsafe Span<byte> Range(string offset, string length)
    {
        long o = long.Parse(offset, CultureInfo.InvariantCulture), n = long.Parse(length, CultureInfo.InvariantCulture);
        if (o < 0 || n < 0 || n > int.MaxValue || o + n > _memory.Length)
            throw new ArgumentException($"[{o}, +{n}) is outside the {_memory.Length}-byte region");
        return new Span<byte>((byte*)_memory.Address + o, (int)n);
    }

    private async Task<string> ExecuteAsync(string[] a)
    {
        switch (a.Length > 0 ? a[0] : "")
        {
            case "FILL":
                DataPattern.Fill(Range(a[1], a[2]), ulong.Parse(a[3], CultureInfo.InvariantCulture), long.Parse(a[1], CultureInfo.InvariantCulture));
                return "OK";
            case "VERIFY":
                long bad = DataPattern.FindMismatch(Range(a[1], a[2]), ulong.Parse(a[3], CultureInfo.InvariantCulture), long.Parse(a[1], CultureInfo.InvariantCulture));
                return bad < 0 ? "OK" : $"MISMATCH {bad}";
            case "ZERO":
                Range(a[1], a[2]).Clear();
                return "OK";
            case "NOTIFIED-VERIFY":
                return await NotifiedVerifyAsync(a).ConfigureAwait(false);
            case "NOTIFICATIONS":
                return await WaitNotificationsAsync(int.Parse(a[1], CultureInfo.InvariantCulture), int.Parse(a[2], CultureInfo.InvariantCulture)).ConfigureAwait(false);
            case "STATS":
                var s = _agent.Stats;
                return $"OK tcp_rx={s.TcpBytesReceived} tcp_tx={s.TcpBytesSent} refused={s.RefusedFrames} malformed={s.MalformedFrames} ucx_rx={s.UcxBytesReceived} ucx_tx={s.UcxBytesSent}";
            case "REREGISTER":
                await _agent.DeregisterAsync(_region).ConfigureAwait(false);
                if (_memory is UcxMemory)
                {
                    // Deregistering freed it: UCX allocates a new region (its bytes start over).
                    var fresh = _agent.AllocateUcx(_memory.Length);
                    (_memory, _region) = (fresh, fresh.Region);
                }
                else
                {
                    _region = _agent.Register(_memory);
                }
                return Ready();
            case "QUIT":
                return "BYE";
            default:
                return $"ERROR unknown command '{string.Join(' ', a)}': FILL, VERIFY, ZERO, NOTIFICATIONS, NOTIFIED-VERIFY, STATS, REREGISTER, QUIT";
        }
    }

    // Checks the bytes the instant a notification is read: they must already be in place.
    private async Task<string> NotifiedVerifyAsync(string[] a)
    {
        using var cts = new CancellationTokenSource(int.Parse(a[4], CultureInfo.InvariantCulture));
        Notification n;
        try
        {
            n = await _agent.Notifications.ReadAsync(cts.Token).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            return "TIMEOUT";
        }
        long bad = DataPattern.FindMismatch(Range(a[1], a[2]), ulong.Parse(a[3], CultureInfo.InvariantCulture), long.Parse(a[1], CultureInfo.InvariantCulture));
        return bad < 0 ? "OK " + Convert.ToBase64String(n.Message) : $"MISMATCH {bad}";
    }

    private async Task<string> WaitNotificationsAsync(int count, int timeoutMs)
    {
        var got = new List<string>();
        using var cts = new CancellationTokenSource(timeoutMs);
        try
        {
            while (got.Count < count)
            {
                var n = await _agent.Notifications.ReadAsync(cts.Token).ConfigureAwait(false);
                got.Add(n.FromAgent + ":" + Convert.ToBase64String(n.Message));
            }
        }
        catch (OperationCanceledException)
        {
            return $"TIMEOUT {got.Count} {string.Join(' ', got)}".TrimEnd();
        }
        return $"OK {string.Join(' ', got)}";
    }

    public async ValueTask DisposeAsync()
    {
        await _agent.DisposeAsync().ConfigureAwait(false);
        (_memory as IDisposable)?.Dispose();
    }
}
