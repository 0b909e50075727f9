using System.Diagnostics;
using KvFabric.Client.Grpc;
using Microsoft.Extensions.Logging;

namespace KvFabric.Rpc;

// Graceful shutdown, as grpc-go's and grpc-java's GracefulStop: new calls are refused and watch streams (health Watch,
// SubscribeEvents) end at once, both UNAVAILABLE, so clients go to another node and peers resubscribe elsewhere without
// holding the stop; calls doing work get the drain period, and those still running then end as UNAVAILABLE too (never
// CANCELLED, which says the client cancelled). Every wait is bounded: the drain period, then DrainEndGrace.
public sealed partial class GrpcDispatcher
{
    /// <summary>How long calls told to end (the drain period is over) get to send their status.</summary>
    public static readonly TimeSpan DrainEndGrace = TimeSpan.FromSeconds(5);

    private readonly CancellationTokenSource _stopping = new(); // new calls refused
    private readonly CancellationTokenSource _watchesEnd = new(); // watch streams end (at once, and those opened later)
    private readonly CancellationTokenSource _drainOver = new(); // calls still running end
    private readonly Lock _shutdownLock = new();
    private Task? _shutdown;
    private TimeSpan _drain;
    private int _running;

    /// <summary>How the server names itself in the statuses of a shutdown ("node a").</summary>
    public string ServerName { get; init; } = "this server";

    /// <summary>Calls in progress (watch streams included).</summary>
    public int RunningCalls => Volatile.Read(ref _running);

    /// <summary>
    /// Starts the graceful shutdown (at once: new calls are refused and watch streams end) and completes when every call
    /// ended: within the drain period, or ended as UNAVAILABLE when it was over (then DrainEndGrace at most). Calling it
    /// again returns the same task.
    /// </summary>
    public Task ShutdownAsync(TimeSpan drain)
    {
        lock (_shutdownLock)
        {
            if (_shutdown is null)
            {
                _drain = drain;
                _stopping.Cancel(); // calls counted before they checked it are waited for; later ones see it
                _watchesEnd.Cancel();
                _shutdown = DrainAsync(drain);
            }

            return _shutdown;
        }
    }

    /// <summary>
    /// Ends the watch streams (health Watch, SubscribeEvents) with UNAVAILABLE, now and any opened later, and nothing else:
    /// for a server that drains its other calls itself (a worker) but must not have watchers hold its stop.
    /// </summary>
    public void EndWatchStreams() => _watchesEnd.Cancel();

    private async Task DrainAsync(TimeSpan drain)
    {
        if (await CallsEndedAsync(drain).ConfigureAwait(false))
            return;
        _log.LogWarning("{Calls} gRPC call(s) still running after the shutdown drain period ({Drain} s) end as UNAVAILABLE", RunningCalls, drain.TotalSeconds);
        await _drainOver.CancelAsync().ConfigureAwait(false);
        if (!await CallsEndedAsync(DrainEndGrace).ConfigureAwait(false))
            _log.LogWarning("{Calls} gRPC call(s) did not end within {Grace} s of being told to; the server stops under them", RunningCalls, DrainEndGrace.TotalSeconds);
    }

    // Polled: this runs once, at shutdown.
    private async Task<bool> CallsEndedAsync(TimeSpan limit)
    {
        long start = Stopwatch.GetTimestamp();
        while (RunningCalls > 0)
        {
            if (Stopwatch.GetElapsedTime(start) >= limit)
                return false;
            await Task.Delay(10).ConfigureAwait(false);
        }

        return true;
    }

    private RpcException Refused(string path) =>
        new(StatusCode.Unavailable, $"{ServerName} is shutting down and takes no new calls ({path}); retry on another node");

    private RpcException EndedByShutdown(string path, bool watch) => watch
        ? new(StatusCode.Unavailable, $"{ServerName} is shutting down: this stream ({path}) ended; subscribe again on another node")
        : new(StatusCode.Unavailable, $"{ServerName} is shutting down and its drain period ({_drain.TotalSeconds:0.#} s) ended before this call ({path}) finished; retry on another node");
}
