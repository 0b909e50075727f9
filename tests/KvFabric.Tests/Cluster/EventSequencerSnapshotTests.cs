using Google.Protobuf;
using KvFabric.Index;
using KvFabric.Tiers;
using Xunit;
using V1 = KvFabric.Rpc.V1;

namespace KvFabric.Tests.Cluster;

/// <summary>Snapshots that must not reach the index: one older than what was applied, one with a run the index cannot take.</summary>
public sealed class EventSequencerSnapshotTests
{
    private const ulong Inc = 91;

    private sealed class Recorder : IIndexUpdates
    {
        public readonly List<string> Calls = [];

        public ValueTask StoredAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> parent, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken)
        {
            Calls.Add($"stored {hashes.Span[0]}");
            return ValueTask.CompletedTask;
        }

        public ValueTask RemovedAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken)
        {
            Calls.Add($"removed {hashes.Span[0]}");
            return ValueTask.CompletedTask;
        }

        public ValueTask ClearedAsync(uint tenant, string node, string worker, TierKind? tier, CancellationToken cancellationToken)
        {
            Calls.Add("cleared");
            return ValueTask.CompletedTask;
        }
    }

    private static ByteString Hash(byte first)
    {
        byte[] b = new byte[16];
        b[0] = first;
        return ByteString.CopyFrom(b);
    }

    private static V1.KvEvent Stored(ulong seq, byte first, bool snapshot = false, V1.Tier tier = V1.Tier.Host) => new()
    {
        Sequence = seq, Node = "a", Worker = "w", Incarnation = Inc, Snapshot = snapshot,
        Stored = new V1.BlocksStored { Hashes = Hash(first), Tier = tier },
    };

    private static V1.KvEvent Removed(ulong seq, byte first) => new()
    {
        Sequence = seq, Node = "a", Worker = "w", Incarnation = Inc,
        Removed = new V1.BlocksRemoved { Hashes = Hash(first), Tier = V1.Tier.Host },
    };

    private static V1.KvEvent End(ulong seq, ulong blocks) => new()
    {
        Sequence = seq, Node = "a", Worker = "w", Incarnation = Inc, Snapshot = true, SnapshotEnd = new V1.SnapshotEnd { Blocks = blocks },
    };

    [Fact]
    public async Task A_snapshot_older_than_the_applied_events_does_not_roll_the_index_back()
    {
        var r = new Recorder();
        var c = new FeedCounters();
        var s = new EventSequencer("a", 1, r, c);
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(2, 11), default));
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Removed(3, 10), default));

        // A snapshot of the same incarnation at sequence 1 (block 10 held): it predates events 2 and 3.
        await s.AcceptAsync(Stored(1, 10, snapshot: true), default);
        FeedVerdict end = await s.AcceptAsync(End(1, 1), default);

        Assert.NotEqual(FeedVerdict.Applied, end);
        Assert.Equal(["stored 10", "stored 11", "removed 10"], r.Calls); // no clear, no block 10 back, 11 not forgotten
        Assert.Equal(3UL, s.LastSequence); // the numbering never goes back
        Assert.Equal(FeedVerdict.Stale, await s.AcceptAsync(Stored(2, 11), default));
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(4, 12), default));
    }

    [Fact]
    public async Task A_snapshot_with_a_run_in_no_known_tier_is_rejected_whole_not_applied_without_it()
    {
        var r = new Recorder();
        var c = new FeedCounters();
        var s = new EventSequencer("a", 1, r, c);
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));

        await s.AcceptAsync(Stored(5, 20, snapshot: true), default);
        FeedVerdict bad = await s.AcceptAsync(Stored(5, 21, snapshot: true, tier: V1.Tier.Unspecified), default);
        string? why = s.LastError;
        FeedVerdict end = await s.AcceptAsync(End(5, 2), default);

        // Applying it would clear the node and store block 20 only, silently losing block 21 (and with it every block
        // below it, whose parent the index then lacks).
        Assert.Equal(FeedVerdict.Malformed, bad);
        Assert.Contains("tier", why, StringComparison.Ordinal);
        Assert.NotEqual(FeedVerdict.Applied, end);
        Assert.Equal(["stored 10"], r.Calls);
        Assert.Equal(1UL, s.LastSequence);
    }
}
