using Microsoft.Extensions.Logging;

namespace KvFabric.Cluster;

/// <summary>
/// A registration kept alive by a lease: a background loop sends a keepalive every ttl/3; when the store says the lease
/// is gone (it expired while the store was unreachable, or keepalives were suspended), the node is put again under a
/// new lease and that is logged. Disposing stops the loop and revokes the lease (the node leaves at once). The stores
/// supply the four lease operations.
/// </summary>
public abstract class LeasedRegistration : IClusterRegistration
{
    private readonly SemaphoreSlim _gate = new(1, 1);
    private readonly CancellationTokenSource _stop = new();
    private readonly ILogger _log;
    private NodeInfo _current;
    private long _leaseId;
    private int _reregistrations;
    private volatile bool _suspended;
    private Task? _loop;
    private int _disposed;
    private bool _unreachableLogged;

    protected LeasedRegistration(NodeInfo self, TimeSpan ttl, ILogger log)
    {
        NodeInfoCodec.Validate(self);
        if (ttl < TimeSpan.FromSeconds(1) || ttl > TimeSpan.FromDays(1))
            throw new ArgumentOutOfRangeException(nameof(ttl), ttl, "a registration's TTL must be between 1 s and 1 day (e.g. 10 s)");
        _current = self;
        Ttl = ttl;
        _log = log;
    }

    public NodeInfo Current => Volatile.Read(ref _current);

    /// <summary>The lease TTL (as the store granted it once registered).</summary>
    public TimeSpan Ttl { get; private set; }

    /// <summary>The lease the node is published under now.</summary>
    public long LeaseId => Interlocked.Read(ref _leaseId);

    /// <summary>How many times the node was put again under a new lease after its lease was lost.</summary>
    public int Reregistrations => Volatile.Read(ref _reregistrations);

    /// <summary>Test hook: stops sending keepalives (the lease then expires after its TTL, as when partitioned).</summary>
    public void Suspend() => _suspended = true;

    /// <summary>Test hook: sends keepalives again (a lease that expired meanwhile is replaced by a new one).</summary>
    public void Resume() => _suspended = false;

    /// <summary>Grants a lease; returns its id and the TTL the store granted.</summary>
    protected abstract Task<(long Lease, TimeSpan Ttl)> GrantAsync(TimeSpan ttl, CancellationToken cancellationToken);

    /// <summary>Puts the node's value under the lease; false when the lease no longer exists.</summary>
    protected abstract Task<bool> PutAsync(NodeInfo info, long lease, CancellationToken cancellationToken);

    /// <summary>Renews the lease; false when it no longer exists. Throws when the store cannot be reached.</summary>
    protected abstract Task<bool> KeepAliveAsync(long lease, CancellationToken cancellationToken);

    /// <summary>Revokes the lease (deleting the node's key); a lease that no longer exists is not an error.</summary>
    protected abstract Task RevokeAsync(long lease, CancellationToken cancellationToken);

    /// <summary>What the store is, for log messages.</summary>
    protected abstract string StoreDescription { get; }

    /// <summary>Grants the first lease and puts the node; then starts the keepalive loop.</summary>
    internal async Task StartAsync(CancellationToken cancellationToken)
    {
        await PublishUnderNewLeaseAsync(Current, cancellationToken).ConfigureAwait(false);
        _loop = Task.Run(() => KeepAliveLoopAsync(_stop.Token), CancellationToken.None);
    }

    public async Task UpdateAsync(NodeInfo info, CancellationToken cancellationToken)
    {
        NodeInfoCodec.Validate(info);
        if (info.Node != Current.Node)
            throw new ArgumentException($"a registration publishes one node: cannot change its name from '{Current.Node}' to '{info.Node}'; register the new name instead", nameof(info));
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        await _gate.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (!await PutAsync(info, LeaseId, cancellationToken).ConfigureAwait(false))
            {
                _log.LogWarning("cluster: lease {Lease} of node {Node} was gone at update ({Store}); re-registering under a new lease",
                    LeaseId, info.Node, StoreDescription);
                await PublishUnderNewLeaseAsync(info, cancellationToken).ConfigureAwait(false);
                Interlocked.Increment(ref _reregistrations);
            }

            Volatile.Write(ref _current, info);
        }
        finally
        {
            _gate.Release();
        }
    }

    private async Task PublishUnderNewLeaseAsync(NodeInfo info, CancellationToken cancellationToken)
    {
        for (int attempt = 0; ; attempt++)
        {
            (long lease, TimeSpan granted) = await GrantAsync(Ttl, cancellationToken).ConfigureAwait(false);
            if (await PutAsync(info, lease, cancellationToken).ConfigureAwait(false))
            {
                Interlocked.Exchange(ref _leaseId, lease);
                Ttl = granted;
                return;
            }

            // The new lease vanished before the put (it cannot expire that fast unless the store is in trouble).
            if (attempt >= 2)
                throw new InvalidOperationException($"cluster: {StoreDescription} lost three fresh leases in a row while registering node {info.Node}; check the store's health and clock");
        }
    }

    private async Task KeepAliveLoopAsync(CancellationToken stop)
    {
        while (!stop.IsCancellationRequested)
        {
            try
            {
                await Task.Delay(Ttl / 3, stop).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }

            if (_suspended)
                continue;
            try
            {
                await _gate.WaitAsync(stop).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                return;
            }

            try
            {
                using var attempt = CancellationTokenSource.CreateLinkedTokenSource(stop);
                attempt.CancelAfter(Ttl / 3 + TimeSpan.FromSeconds(1));
                long lease = LeaseId;
                if (!await KeepAliveAsync(lease, attempt.Token).ConfigureAwait(false))
                {
                    await PublishUnderNewLeaseAsync(Current, attempt.Token).ConfigureAwait(false);
                    Interlocked.Increment(ref _reregistrations);
                    _log.LogWarning("cluster: lease {Old} of node {Node} was lost (it expired: keepalives did not reach {Store} in time); re-registered under lease {New}",
                        lease, Current.Node, StoreDescription, LeaseId);
                }

                if (_unreachableLogged)
                {
                    _log.LogInformation("cluster: keepalives of node {Node} reach {Store} again", Current.Node, StoreDescription);
                    _unreachableLogged = false;
                }
            }
            catch (Exception e) when (!stop.IsCancellationRequested)
            {
                // Unreachable or slow: keep trying every ttl/3; the lease is checked again once the store answers.
                if (!_unreachableLogged)
                {
                    _log.LogWarning("cluster: keepalive of node {Node} (lease {Lease}) failed: {Error}; retrying every {Interval}",
                        Current.Node, LeaseId, e.Message, Ttl / 3);
                    _unreachableLogged = true;
                }
            }
            catch (Exception)
            {
                return; // stopping
            }
            finally
            {
                _gate.Release();
            }
        }
    }

    /// <summary>Stops the keepalives and revokes the lease (bounded by 5 s; if the store is unreachable the lease expires by its TTL).</summary>
    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        await _stop.CancelAsync().ConfigureAwait(false);
        if (_loop is not null)
            await _loop.ConfigureAwait(false);
        try
        {
            using var revoke = new CancellationTokenSource(TimeSpan.FromSeconds(5));
            await RevokeAsync(LeaseId, revoke.Token).ConfigureAwait(false);
        }
        catch (Exception e)
        {
            _log.LogWarning("cluster: could not revoke lease {Lease} of node {Node} at {Store}: {Error}; it leaves when the lease expires (within {Ttl})",
                LeaseId, Current.Node, StoreDescription, e.Message, Ttl);
        }

        await DisposeCoreAsync().ConfigureAwait(false);
        _stop.Dispose();
        GC.SuppressFinalize(this);
    }

    /// <summary>Releases what the derived registration holds (after the lease was revoked).</summary>
    protected virtual ValueTask DisposeCoreAsync() => ValueTask.CompletedTask;
}
