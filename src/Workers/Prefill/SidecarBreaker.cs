using KvFabric.Client.Grpc;

namespace KvFabric.Workers.Prefill;

/// <summary>
/// A circuit breaker in front of the sidecar. When a call fails as unavailable or too slow (the sidecar is down,
/// restarting, or stalled), the prefill stops calling it for a cool-down, so requests during an outage are computed at
/// once instead of each waiting out the client's retries or deadline while holding the compute. The first call after the
/// cool-down probes: a success closes the breaker, another failure doubles the cool-down (up to <see cref="MaxCooldown"/>).
/// Fast failures (RESOURCE_EXHAUSTED, INTERNAL) do not open it: they cost no wait.
/// </summary>
public sealed class SidecarBreaker(TimeProvider? time = null)
{
    private readonly TimeProvider _time = time ?? TimeProvider.System;
    private readonly Lock _lock = new();
    private long _openUntil;       // timestamp on _time; 0 when closed
    private bool _probing;         // the call let through after a cool-down has not reported yet
    private TimeSpan _cooldown;
    private string _reason = "";
    private long _skipped;

    public TimeSpan InitialCooldown { get; init; } = TimeSpan.FromMilliseconds(500);
    public TimeSpan MaxCooldown { get; init; } = TimeSpan.FromSeconds(8);
    /// <summary>Fabric calls not made because the breaker was open.</summary>
    public long Skipped => Interlocked.Read(ref _skipped);
    /// <summary>The current cool-down (zero when closed).</summary>
    public TimeSpan Cooldown
    {
        get { lock (_lock) return _openUntil == 0 ? TimeSpan.Zero : _cooldown; }
    }

    /// <summary>Whether the sidecar may be called now; if not, why (for the outcome's FabricError) and the call is counted as skipped.</summary>
    public bool Allow(out string? why)
    {
        lock (_lock)
        {
            long now = _time.GetTimestamp();
            if (_openUntil == 0)
            {
                why = null;
                return true;
            }
            if (now >= _openUntil)
            {
                // The cool-down is over: this call probes; the others keep skipping until it reports (or, if it never
                // does, for one more cool-down).
                _probing = true;
                _openUntil = now + (long)(_cooldown.TotalSeconds * _time.TimestampFrequency);
                why = null;
                return true;
            }
            TimeSpan left = _time.GetElapsedTime(_time.GetTimestamp(), _openUntil);
            why = $"sidecar not called for another {left.TotalMilliseconds:0} ms (circuit open for {_cooldown.TotalMilliseconds:0} ms after: {_reason})";
        }
        Interlocked.Increment(ref _skipped);
        return false;
    }

    public static bool Opens(StatusCode status) => status is StatusCode.Unavailable or StatusCode.DeadlineExceeded;

    public void Failed(StatusCode status, string reason)
    {
        if (!Opens(status))
            return;
        lock (_lock)
        {
            // Already open: a call that started before it opened failed too. Only a failure once the cool-down is over
            // (a probe) lengthens it, not every call that was in flight when the sidecar went away.
            if (_openUntil != 0 && _time.GetTimestamp() < _openUntil && !_probing)
                return;
            _probing = false;
            _cooldown = _openUntil == 0 ? InitialCooldown : TimeSpan.FromTicks(Math.Min(MaxCooldown.Ticks, 2 * _cooldown.Ticks));
            _openUntil = _time.GetTimestamp() + (long)(_cooldown.TotalSeconds * _time.TimestampFrequency);
            _reason = $"{status}: {reason}";
        }
    }

    public void Succeeded()
    {
        lock (_lock)
        {
            _openUntil = 0;
            _probing = false;
        }
    }
}
