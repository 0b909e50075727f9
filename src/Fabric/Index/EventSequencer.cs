using KvFabric.Rpc;
using KvFabric.Tiers;
using V1 = KvFabric.Rpc.V1;

namespace KvFabric.Index;

/// <summary>What a replica does with the events of one node's stream, in order. Implementations may queue.</summary>
public interface IIndexUpdates
{
    /// <summary>Blocks stored in one tier of (node, worker): hashes packed 16 bytes each, children of parent (empty: root).</summary>
    ValueTask StoredAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> parent, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken);

    ValueTask RemovedAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken);

    /// <summary>Every block of (node, worker) for the tenant in tier (null: all tiers) is gone.</summary>
    ValueTask ClearedAsync(uint tenant, string node, string worker, TierKind? tier, CancellationToken cancellationToken);
}

public enum FeedVerdict
{
    /// <summary>Applied to the index (or, for SnapshotEnd, the whole snapshot was).</summary>
    Applied,
    /// <summary>Part of a snapshot, held until its SnapshotEnd.</summary>
    Buffered,
    /// <summary>Already seen (duplicate or older delivery): ignored, harmless.</summary>
    Stale,
    /// <summary>Events are missing before this one: resubscribe from LastSequence + 1 (the node then sends the range or a snapshot).</summary>
    Gap,
    /// <summary>Not a valid event of this stream: rejected and counted; resubscribe to get back in line.</summary>
    Malformed,
}

/// <summary>Counters of one replica's event feeds; every field only grows.</summary>
public sealed class FeedCounters
{
    public long Applied, Stale, Gaps, Malformed, Snapshots, Resubscribes;
}

/// <summary>
/// Puts one node's event stream for one tenant in order. Within one incarnation of the node, events must arrive with
/// sequence numbers growing by one: an older or repeated one is stale (ignored and counted), a jump is a gap (the caller
/// resubscribes from <see cref="LastSequence"/> + 1 with <see cref="Incarnation"/>, and the node answers with the missing
/// range or a snapshot). A snapshot (Stored events with snapshot = true, closed by SnapshotEnd) replaces everything the
/// replica knew of the node for the tenant. Not thread-safe: one feed owns it.
/// </summary>
public sealed class EventSequencer(string node, uint tenant, IIndexUpdates index, FeedCounters counters)
{
    private List<V1.KvEvent> _snapshot = [];
    private bool _inSnapshot;
    private ulong _snapshotSequence;

    public string Node { get; } = node;
    public uint Tenant { get; } = tenant;
    public ulong Incarnation { get; private set; }
    public ulong LastSequence { get; private set; }
    /// <summary>The worker name the node's events carry (empty until the first one).</summary>
    public string Worker { get; private set; } = string.Empty;
    /// <summary>Why the last event was rejected, for logs.</summary>
    public string? LastError { get; private set; }

    public async ValueTask<FeedVerdict> AcceptAsync(V1.KvEvent e, CancellationToken cancellationToken)
    {
        if (e.Node != Node)
            return Reject($"an event of node '{e.Node}' arrived on node '{Node}''s stream");
        if (e.Snapshot)
            return await SnapshotAsync(e, cancellationToken).ConfigureAwait(false);
        if (_inSnapshot)
        {
            ResetSnapshot();
            return Reject($"a live event (sequence {e.Sequence}) arrived before the snapshot at {_snapshotSequence} ended");
        }

        if (Incarnation != 0 && e.Incarnation != Incarnation)
        {
            // The node restarted: its numbering began again. Resubscribing with the old incarnation brings a snapshot.
            Interlocked.Increment(ref counters.Gaps);
            return FeedVerdict.Gap;
        }

        if (e.Sequence <= LastSequence)
        {
            Interlocked.Increment(ref counters.Stale);
            return FeedVerdict.Stale;
        }

        if (e.Sequence != LastSequence + 1)
        {
            Interlocked.Increment(ref counters.Gaps);
            return FeedVerdict.Gap;
        }

        if (e.BodyCase is not (V1.KvEvent.BodyOneofCase.Stored or V1.KvEvent.BodyOneofCase.Removed or V1.KvEvent.BodyOneofCase.Cleared))
            return Reject($"event {e.Sequence} of node '{Node}' has no known body ({e.BodyCase})");
        if (!TryTier(e, out TierKind? tier, out string? why))
            return Reject(why!);
        // Counted as seen even if the index then rejects its content (unknown parent, bad length): the numbering moves on.
        Incarnation = e.Incarnation;
        LastSequence = e.Sequence;
        Worker = e.Worker;
        await ApplyAsync(e, tier, cancellationToken).ConfigureAwait(false);
        Interlocked.Increment(ref counters.Applied);
        return FeedVerdict.Applied;
    }

    private async ValueTask<FeedVerdict> SnapshotAsync(V1.KvEvent e, CancellationToken cancellationToken)
    {
        if (!_inSnapshot)
        {
            _inSnapshot = true;
            _snapshotSequence = e.Sequence;
        }
        else if (e.Sequence != _snapshotSequence)
        {
            ResetSnapshot();
            return Reject($"snapshot events of node '{Node}' changed sequence from {_snapshotSequence} to {e.Sequence} before SnapshotEnd");
        }

        if (e.BodyCase == V1.KvEvent.BodyOneofCase.Stored)
        {
            // A run the index could not take would be left out of the snapshot silently (and every block below it
            // rejected for its unknown parent) while the snapshot replaces everything known of the node: reject it whole.
            if (!TryTier(e, out _, out string? badTier))
            {
                ResetSnapshot();
                return Reject($"snapshot of node '{Node}' at {e.Sequence}: {badTier}");
            }

            if (_snapshot.Count >= MaxSnapshotEvents)
            {
                ResetSnapshot();
                return Reject($"the snapshot of node '{Node}' exceeds {MaxSnapshotEvents} events");
            }

            _snapshot.Add(e);
            return FeedVerdict.Buffered;
        }

        if (e.BodyCase != V1.KvEvent.BodyOneofCase.SnapshotEnd)
        {
            ResetSnapshot();
            return Reject($"a snapshot of node '{Node}' may hold only Stored events and SnapshotEnd; got {e.BodyCase}");
        }

        if (Incarnation != 0 && e.Incarnation == Incarnation && e.Sequence < LastSequence)
        {
            // Older than events of the same incarnation already applied: replacing the node's blocks by it would roll
            // the index (and the numbering) back. Ignored like any older delivery.
            ResetSnapshot();
            Interlocked.Increment(ref counters.Stale);
            return FeedVerdict.Stale;
        }

        ulong blocks = 0;
        foreach (V1.KvEvent s in _snapshot)
            blocks += (ulong)(s.Stored.Hashes.Length / Blocks.BlockHash.Size);
        if (blocks != e.SnapshotEnd.Blocks)
        {
            ResetSnapshot();
            return Reject($"the snapshot of node '{Node}' at {e.Sequence} listed {blocks} blocks but its end says {e.SnapshotEnd.Blocks}");
        }

        // Everything known of the node's worker goes, then the snapshot's content: queued in this order, applied in it.
        await index.ClearedAsync(Tenant, Node, e.Worker, null, cancellationToken).ConfigureAwait(false);
        if (Worker.Length > 0 && Worker != e.Worker)
            await index.ClearedAsync(Tenant, Node, Worker, null, cancellationToken).ConfigureAwait(false);
        foreach (V1.KvEvent s in _snapshot)
        {
            TryTier(s, out TierKind? tier, out _); // checked when buffered
            await index.StoredAsync(Tenant, Node, s.Worker, s.Stored.ParentHash.Memory, s.Stored.Hashes.Memory, tier!.Value, cancellationToken).ConfigureAwait(false);
        }

        Incarnation = e.Incarnation;
        LastSequence = e.Sequence;
        Worker = e.Worker;
        ResetSnapshot();
        Interlocked.Increment(ref counters.Snapshots);
        return FeedVerdict.Applied;
    }

    private const int MaxSnapshotEvents = 1 << 22;

    private void ResetSnapshot()
    {
        _inSnapshot = false;
        if (_snapshot.Capacity > 4096)
            _snapshot = []; // a large snapshot's buffer is not kept for the node's lifetime
        else
            _snapshot.Clear();
    }

    /// <summary>A new subscription begins: a snapshot the previous stream left half-sent is dropped.</summary>
    public void StreamStarted() => ResetSnapshot();

    private FeedVerdict Reject(string why)
    {
        LastError = why;
        Interlocked.Increment(ref counters.Malformed);
        return FeedVerdict.Malformed;
    }

    private static bool TryTier(V1.KvEvent e, out TierKind? tier, out string? why)
    {
        V1.Tier wire = e.BodyCase switch
        {
            V1.KvEvent.BodyOneofCase.Stored => e.Stored.Tier,
            V1.KvEvent.BodyOneofCase.Removed => e.Removed.Tier,
            V1.KvEvent.BodyOneofCase.Cleared => e.Cleared.Tier,
            _ => V1.Tier.Unspecified,
        };
        why = null;
        tier = null;
        if (wire == V1.Tier.Unspecified)
        {
            if (e.BodyCase == V1.KvEvent.BodyOneofCase.Cleared)
                return true; // all tiers
            why = $"event {e.Sequence} names no tier";
            return false;
        }

        if (!Hashes.TryFromWire(wire, out TierKind t))
        {
            why = $"event {e.Sequence} names unknown tier {(int)wire}";
            return false;
        }

        tier = t;
        return true;
    }

    private ValueTask ApplyAsync(V1.KvEvent e, TierKind? tier, CancellationToken cancellationToken) => e.BodyCase switch
    {
        V1.KvEvent.BodyOneofCase.Stored => index.StoredAsync(Tenant, Node, e.Worker, e.Stored.ParentHash.Memory, e.Stored.Hashes.Memory, tier!.Value, cancellationToken),
        V1.KvEvent.BodyOneofCase.Removed => index.RemovedAsync(Tenant, Node, e.Worker, e.Removed.Hashes.Memory, tier!.Value, cancellationToken),
        _ => index.ClearedAsync(Tenant, Node, e.Worker, tier, cancellationToken),
    };
}
