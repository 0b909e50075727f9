using System.Diagnostics;
using System.Threading.Channels;
using KvFabric.Cluster;

namespace KvFabric.Tests.Cluster;

/// <summary>Runs a store's WatchAsync in the background and hands its changes out one at a time, each wait with a deadline.</summary>
public sealed class WatchProbe : IAsyncDisposable
{
    private readonly Channel<MembershipChange> _changes = Channel.CreateUnbounded<MembershipChange>();
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _pump;
    private readonly string _what;

    public WatchProbe(IClusterStore store, string what)
    {
        _what = what;
        _pump = Task.Run(async () =>
        {
            try
            {
                await foreach (MembershipChange c in store.WatchAsync(_stop.Token))
                    _changes.Writer.TryWrite(c);
                _changes.Writer.TryComplete();
            }
            catch (OperationCanceledException) when (_stop.IsCancellationRequested)
            {
                _changes.Writer.TryComplete();
            }
            catch (Exception e)
            {
                _changes.Writer.TryComplete(e);
            }
        });
    }

    /// <summary>The next change; fails naming what was awaited if none comes within the deadline.</summary>
    public async Task<MembershipChange> NextAsync(TimeSpan deadline, string expecting)
    {
        using var timeout = new CancellationTokenSource(deadline);
        try
        {
            return await _changes.Reader.ReadAsync(timeout.Token);
        }
        catch (OperationCanceledException) when (timeout.IsCancellationRequested)
        {
            throw new TimeoutException($"{_what}: no membership change within {deadline} while expecting {expecting}");
        }
        catch (ChannelClosedException e) when (e.InnerException is not null)
        {
            throw e.InnerException; // the watch failed: its own error
        }
    }

    /// <summary>Skips changes until one matches; fails naming what was awaited and what came instead.</summary>
    public async Task<MembershipChange> UntilAsync(Func<MembershipChange, bool> match, TimeSpan deadline, string expecting)
    {
        var clock = Stopwatch.StartNew();
        var seen = new List<string>();
        while (true)
        {
            TimeSpan left = deadline - clock.Elapsed;
            if (left <= TimeSpan.Zero)
                throw new TimeoutException($"{_what}: {expecting} did not come within {deadline}; saw: {string.Join(", ", seen)}");
            MembershipChange c;
            try
            {
                c = await NextAsync(left, expecting);
            }
            catch (TimeoutException)
            {
                throw new TimeoutException($"{_what}: {expecting} did not come within {deadline}; saw: {string.Join(", ", seen)}");
            }

            if (match(c))
                return c;
            seen.Add($"{c.Kind} {c.Node.Node}");
        }
    }

    /// <summary>True when no change arrives within <paramref name="quiet"/>.</summary>
    public async Task<MembershipChange?> PeekAsync(TimeSpan quiet)
    {
        try
        {
            return await NextAsync(quiet, "nothing");
        }
        catch (TimeoutException)
        {
            return null;
        }
    }

    public Task Completion => _pump;

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync();
        await _pump.WaitAsync(TimeSpan.FromSeconds(20));
        _stop.Dispose();
    }
}

public static class ClusterNodes
{
    public static NodeInfo Node(string name, double load = 0.25, ulong incarnation = 1) =>
        new(name, "worker-" + name, "127.0.0.1:" + (50000 + (name.Length * 7) % 1000), [1, 2, 3, (byte)name.Length, 0xff], load, incarnation);

    /// <summary>Waits until <paramref name="condition"/> holds; fails with <paramref name="what"/> after the deadline.</summary>
    public static Task EventuallyAsync(Func<bool> condition, TimeSpan deadline, Func<string> what) =>
        EventuallyAsync(() => Task.FromResult(condition()), deadline, what);

    public static async Task EventuallyAsync(Func<Task<bool>> condition, TimeSpan deadline, Func<string> what)
    {
        var clock = Stopwatch.StartNew();
        while (!await condition())
        {
            if (clock.Elapsed > deadline)
                throw new TimeoutException($"not within {deadline}: {what()}");
            await Task.Delay(20);
        }
    }

    public static string UniqueCluster(string test) => test + "-" + Guid.NewGuid().ToString("N")[..8];
}

/// <summary>Keeps what was logged, to check that the stores say what happened.</summary>
public sealed class ListLogger : Microsoft.Extensions.Logging.ILogger
{
    private readonly List<string> _lines = [];

    public IReadOnlyList<string> Lines
    {
        get
        {
            lock (_lines)
                return [.. _lines];
        }
    }

    public bool Contains(string fragment) => Lines.Any(l => l.Contains(fragment, StringComparison.Ordinal));

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;

    public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state,
        Exception? exception, Func<TState, Exception?, string> formatter)
    {
        lock (_lines)
            _lines.Add($"{logLevel}: {formatter(state, exception)}");
    }
}
