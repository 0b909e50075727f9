using System.Runtime.CompilerServices;
using System.Threading.Channels;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;

namespace KvFabric.Cluster;

/// <summary>
/// The embedded cluster store for one machine: members live in memory, under leases with real TTL timers (a
/// registration whose keepalives stop is removed after its TTL, and watchers see it leave). Thread-safe.
/// <see cref="CreatePeer"/> gives a second store over the same memory (two "nodes" of one process).
/// </summary>
public sealed class InProcessClusterStore : IClusterStore
{
    private readonly State _state;
    private readonly ILogger _log;
    private readonly bool _ownsState;
    private readonly CancellationTokenSource _disposed = new();
    private readonly HashSet<Registration> _registrations = [];

    public InProcessClusterStore(string cluster, TimeProvider? time = null, ILogger? log = null)
    {
        ClusterKeys.ValidateName(cluster, "cluster name");
        _state = new State(cluster, time ?? TimeProvider.System);
        _log = log ?? NullLogger.Instance;
        _ownsState = true;
    }

    private InProcessClusterStore(State state, ILogger log)
    {
        _state = state;
        _log = log;
    }

    public string Cluster => _state.Cluster;

    public string Description => $"in-process (cluster {_state.Cluster})";

    /// <summary>Another store over the same members (disposing it leaves the members to this one).</summary>
    public InProcessClusterStore CreatePeer() => new(_state, _log);

    public async Task<IClusterRegistration> RegisterAsync(NodeInfo self, TimeSpan ttl, CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed.IsCancellationRequested, this);
        var registration = new Registration(this, self, ttl);
        await registration.StartAsync(cancellationToken).ConfigureAwait(false);
        lock (_registrations)
            _registrations.Add(registration);
        return registration;
    }

    public Task<IReadOnlyList<NodeInfo>> ListAsync(CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed.IsCancellationRequested, this);
        cancellationToken.ThrowIfCancellationRequested();
        lock (_state.Lock)
            return Task.FromResult<IReadOnlyList<NodeInfo>>(_state.Members.Values.Select(m => m.Info).OrderBy(n => n.Node, StringComparer.Ordinal).ToList());
    }

    public async IAsyncEnumerable<MembershipChange> WatchAsync([EnumeratorCancellation] CancellationToken cancellationToken)
    {
        ObjectDisposedException.ThrowIf(_disposed.IsCancellationRequested, this);
        var changes = WatchChannel.Create(singleWriter: false);
        lock (_state.Lock)
        {
            foreach (Member m in _state.Members.Values.OrderBy(m => m.Info.Node, StringComparer.Ordinal))
                WatchChannel.Emit(changes.Writer, new MembershipChange(MembershipChangeKind.Joined, m.Info), Description);
            _state.Watchers.Add(changes.Writer);
        }

        try
        {
            await foreach (MembershipChange change in WatchChannel.ReadAsync(changes.Reader, cancellationToken, _disposed.Token).ConfigureAwait(false))
                yield return change;
        }
        finally
        {
            lock (_state.Lock)
                _state.Watchers.Remove(changes.Writer);
        }
    }

    /// <summary>Ends the watches and revokes the registrations made through this store; the first store also drops the members.</summary>
    public async ValueTask DisposeAsync()
    {
        if (_disposed.IsCancellationRequested)
            return;
        await _disposed.CancelAsync().ConfigureAwait(false);
        Registration[] open;
        lock (_registrations)
            open = [.. _registrations];
        foreach (Registration r in open)
            await r.DisposeAsync().ConfigureAwait(false);
        if (_ownsState)
            _state.Dispose();
    }

    private sealed record Member(NodeInfo Info, long Lease);

    private sealed class Lease(long id, TimeSpan ttl)
    {
        public long Id { get; } = id;
        public TimeSpan Ttl { get; } = ttl;
        public ITimer? Timer { get; set; }
        public long RenewedAt { get; set; }
        public HashSet<string> Nodes { get; } = new(StringComparer.Ordinal);
    }

    /// <summary>The members, leases and watchers; every field under Lock.</summary>
    private sealed class State(string cluster, TimeProvider time) : IDisposable
    {
        public object Lock { get; } = new();
        public string Cluster { get; } = cluster;
        public TimeProvider Time { get; } = time;
        public Dictionary<string, Member> Members { get; } = new(StringComparer.Ordinal);
        public Dictionary<long, Lease> Leases { get; } = [];
        public List<ChannelWriter<MembershipChange>> Watchers { get; } = [];
        private long _nextLease;

        private bool _disposed;

        public long Grant(TimeSpan ttl)
        {
            lock (Lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, typeof(InProcessClusterStore));
                var lease = new Lease(++_nextLease, ttl) { RenewedAt = Time.GetTimestamp() };
                Leases.Add(lease.Id, lease);
                lease.Timer = Time.CreateTimer(_ => Expire(lease.Id), null, ttl, Timeout.InfiniteTimeSpan);
                return lease.Id;
            }
        }

        public bool KeepAlive(long id)
        {
            lock (Lock)
            {
                if (!Leases.TryGetValue(id, out Lease? lease))
                    return false;
                lease.RenewedAt = Time.GetTimestamp();
                lease.Timer!.Change(lease.Ttl, Timeout.InfiniteTimeSpan);
                return true;
            }
        }

        public bool Put(NodeInfo info, long leaseId)
        {
            lock (Lock)
            {
                if (!Leases.TryGetValue(leaseId, out Lease? lease))
                    return false;
                bool existed = Members.TryGetValue(info.Node, out Member? old);
                if (existed && old!.Lease != leaseId && Leases.TryGetValue(old.Lease, out Lease? previous))
                    previous.Nodes.Remove(info.Node);
                Members[info.Node] = new Member(info, leaseId);
                lease.Nodes.Add(info.Node);
                if (!existed)
                    Publish(new MembershipChange(MembershipChangeKind.Joined, info));
                else if (!old!.Info.SameAs(info))
                    Publish(new MembershipChange(MembershipChangeKind.Updated, info));
                return true;
            }
        }

        public void Revoke(long id)
        {
            lock (Lock)
                Remove(id);
        }

        private void Expire(long id)
        {
            lock (Lock)
            {
                if (!Leases.TryGetValue(id, out Lease? lease))
                    return;
                // A keepalive may have renewed the lease while this callback waited for the lock (or the timer fired early).
                TimeSpan left = lease.Ttl - Time.GetElapsedTime(lease.RenewedAt);
                if (left > TimeSpan.Zero)
                    lease.Timer!.Change(left, Timeout.InfiniteTimeSpan);
                else
                    Remove(id);
            }
        }

        private void Remove(long id)
        {
            if (!Leases.Remove(id, out Lease? lease))
                return;
            lease.Timer!.Dispose();
            foreach (string node in lease.Nodes.Order(StringComparer.Ordinal))
            {
                if (Members.Remove(node, out Member? m))
                    Publish(new MembershipChange(MembershipChangeKind.Left, m.Info));
            }
        }

        private void Publish(MembershipChange change)
        {
            // A watcher that fell a whole queue behind is ended (it lists again) and dropped: nothing grows without bound.
            Watchers.RemoveAll(w => !WatchChannel.Emit(w, change, $"in-process (cluster {Cluster})"));
        }

        public void Dispose()
        {
            lock (Lock)
            {
                _disposed = true;
                foreach (Lease lease in Leases.Values)
                    lease.Timer?.Dispose();
                Leases.Clear();
                Members.Clear();
            }
        }
    }

    private sealed class Registration(InProcessClusterStore store, NodeInfo self, TimeSpan ttl)
        : LeasedRegistration(self, ttl, store._log)
    {
        private readonly State _state = store._state;

        protected override string StoreDescription => store.Description;

        protected override Task<(long Lease, TimeSpan Ttl)> GrantAsync(TimeSpan ttl, CancellationToken cancellationToken) =>
            Task.FromResult((_state.Grant(ttl), ttl));

        protected override Task<bool> PutAsync(NodeInfo info, long lease, CancellationToken cancellationToken) =>
            Task.FromResult(_state.Put(info, lease));

        protected override Task<bool> KeepAliveAsync(long lease, CancellationToken cancellationToken) =>
            Task.FromResult(_state.KeepAlive(lease));

        protected override Task RevokeAsync(long lease, CancellationToken cancellationToken)
        {
            _state.Revoke(lease);
            return Task.CompletedTask;
        }

        protected override ValueTask DisposeCoreAsync()
        {
            lock (store._registrations)
                store._registrations.Remove(this);
            return ValueTask.CompletedTask;
        }
    }
}
