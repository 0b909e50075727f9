using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Service;

public enum KvEventKind : byte
{
    Stored = 1,
    Removed = 2,
    Cleared = 3,
}

/// <summary>One KV event: blocks stored (children of Parent, in chain order) or removed, in one tier, or everything cleared.</summary>
public sealed record KvEvent(ulong Sequence, KvEventKind Kind, BlockHash? Parent, BlockHash[] Hashes, TierKind Tier, bool Snapshot = false);

/// <summary>
/// The KV event logs of one node, one per tenant: sequence numbers start at 1 and grow by 1 per event; the last
/// `capacity` events are kept so a subscriber that fell behind can resume, and one that fell further back is told to
/// take a snapshot. Waiting readers are woken by appends.
/// </summary>
public sealed class KvEventLogs(int capacity = 65536)
{
    private readonly Dictionary<uint, Log> _logs = new();
    private readonly Lock _lock = new();

    private sealed class Log(int capacity)
    {
        public readonly KvEvent?[] Ring = new KvEvent?[capacity];
        public ulong Last;
        public TaskCompletionSource Changed = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public bool Watched; // a reader holds Changed: the next append must complete it
    }

    /// <summary>Random per start of the node: sequence numbers restart with each incarnation.</summary>
    public ulong Incarnation { get; } = (ulong)Random.Shared.NextInt64(1, long.MaxValue);

    public int Capacity { get; } = capacity > 0 ? capacity : throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "event log capacity must be positive");

    public ulong Append(uint tenant, KvEventKind kind, BlockHash? parent, BlockHash[] hashes, TierKind tier)
    {
        TaskCompletionSource? changed = null;
        ulong seq;
        lock (_lock)
        {
            Log log = LogOf(tenant);
            seq = ++log.Last;
            log.Ring[(int)(seq % (ulong)Capacity)] = new KvEvent(seq, kind, parent, hashes, tier);
            if (log.Watched)
            {
                // Only when a subscriber waits: no signal object per event otherwise.
                changed = log.Changed;
                log.Changed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
                log.Watched = false;
            }
        }

        changed?.TrySetResult();
        return seq;
    }

    /// <summary>Appends the same event to every tenant's log (a tier cleared for everyone).</summary>
    public void AppendToAll(KvEventKind kind, TierKind tier)
    {
        uint[] tenants;
        lock (_lock)
            tenants = _logs.Keys.ToArray();
        foreach (uint t in tenants)
            Append(t, kind, null, [], tier);
    }

    public ulong LastSequence(uint tenant)
    {
        lock (_lock)
            return LogOf(tenant).Last;
    }

    /// <summary>
    /// Copies the retained events with sequence >= from (up to max) into output. Returns false when `from` is older than
    /// the oldest retained event or beyond the next one (the caller needs a snapshot). `changed` completes at the next append.
    /// </summary>
    public bool TryRead(uint tenant, ulong from, List<KvEvent> output, int max, out Task changed)
    {
        lock (_lock)
        {
            Log log = LogOf(tenant);
            changed = log.Changed.Task;
            log.Watched = true;
            ulong oldest = log.Last >= (ulong)Capacity ? log.Last - (ulong)Capacity + 1 : 1;
            // Older than what is kept, or newer than anything sent (a subscriber that saw another incarnation of this node,
            // whose sequence numbers restarted): either way only a snapshot brings it back in line.
            if (from < oldest || from > log.Last + 1)
                return false;
            for (ulong s = from; s <= log.Last && output.Count < max; s++)
                output.Add(log.Ring[(int)(s % (ulong)Capacity)]!);
            return true;
        }
    }

    private Log LogOf(uint tenant)
    {
        if (!_logs.TryGetValue(tenant, out Log? log))
            _logs[tenant] = log = new Log(Capacity);
        return log;
    }
}
