using Google.Protobuf;
using KvFabric.Index;
using KvFabric.Tiers;
using Xunit;
using V1 = KvFabric.Rpc.V1;

namespace KvFabric.Tests.Cluster;

public sealed class EventSequencerTests
{
    private const ulong Inc = 77;

    /// <summary>Records what the sequencer hands the index, as readable lines.</summary>
    private sealed class Recorder : IIndexUpdates
    {
        public readonly List<string> Calls = [];

        public ValueTask StoredAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> parent, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken)
        {
            Calls.Add($"stored {node}/{worker} {tier} parent={(parent.Length == 0 ? "-" : parent.Span[0].ToString())} n={hashes.Length / 16} first={hashes.Span[0]}");
            return ValueTask.CompletedTask;
        }

        public ValueTask RemovedAsync(uint tenant, string node, string worker, ReadOnlyMemory<byte> hashes, TierKind tier, CancellationToken cancellationToken)
        {
            Calls.Add($"removed {node}/{worker} {tier} n={hashes.Length / 16}");
            return ValueTask.CompletedTask;
        }

        public ValueTask ClearedAsync(uint tenant, string node, string worker, TierKind? tier, CancellationToken cancellationToken)
        {
            Calls.Add($"cleared {node}/{worker} {(tier is null ? "all" : tier.ToString())}");
            return ValueTask.CompletedTask;
        }
    }

    private static ByteString Hashes(params byte[] firstBytes)
    {
        byte[] b = new byte[firstBytes.Length * 16];
        for (int i = 0; i < firstBytes.Length; i++)
            b[i * 16] = firstBytes[i];
        return ByteString.CopyFrom(b);
    }

    private static V1.KvEvent Stored(ulong seq, byte first, byte? parent = null, ulong incarnation = Inc, bool snapshot = false, string node = "a") => new()
    {
        Sequence = seq, Node = node, Worker = "w", Incarnation = incarnation, Snapshot = snapshot,
        Stored = new V1.BlocksStored { ParentHash = parent is { } p ? Hashes(p) : ByteString.Empty, Hashes = Hashes(first), Tier = V1.Tier.Host },
    };

    private static V1.KvEvent End(ulong seq, ulong blocks, ulong incarnation = Inc) => new()
    {
        Sequence = seq, Node = "a", Worker = "w", Incarnation = incarnation, Snapshot = true, SnapshotEnd = new V1.SnapshotEnd { Blocks = blocks },
    };

    private static (EventSequencer, Recorder, FeedCounters) New()
    {
        var r = new Recorder();
        var c = new FeedCounters();
        return (new EventSequencer("a", 1, r, c), r, c);
    }

    [Fact]
    public async Task In_order_events_apply_duplicates_are_stale_and_a_jump_is_a_gap()
    {
        var (s, r, c) = New();
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(2, 11, parent: 10), default));
        Assert.Equal(FeedVerdict.Stale, await s.AcceptAsync(Stored(2, 11, parent: 10), default));
        Assert.Equal(FeedVerdict.Stale, await s.AcceptAsync(Stored(1, 10), default));
        Assert.Equal(FeedVerdict.Gap, await s.AcceptAsync(Stored(5, 12, parent: 11), default));
        Assert.Equal(2UL, s.LastSequence);
        Assert.Equal(Inc, s.Incarnation);
        // Resumed from 3 after the gap: the missing range arrives and applies; the jump was never applied.
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(3, 12, parent: 11), default));
        Assert.Equal(["stored a/w Host parent=- n=1 first=10", "stored a/w Host parent=10 n=1 first=11", "stored a/w Host parent=11 n=1 first=12"], r.Calls);
        Assert.Equal((3L, 2L, 1L, 0L), (c.Applied, c.Stale, c.Gaps, c.Malformed));
    }

    [Fact]
    public async Task A_fresh_feed_must_start_at_one_and_a_new_incarnation_is_a_gap()
    {
        var (s, _, c) = New();
        Assert.Equal(FeedVerdict.Gap, await s.AcceptAsync(Stored(7, 10), default)); // from 1 was asked: 7 means 1..6 are missing
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));
        Assert.Equal(FeedVerdict.Gap, await s.AcceptAsync(Stored(2, 11, parent: 10, incarnation: Inc + 1), default)); // the node restarted
        Assert.Equal(Inc, s.Incarnation);
        Assert.Equal(2L, c.Gaps);
    }

    [Fact]
    public async Task A_snapshot_replaces_what_was_known_and_only_when_it_is_complete()
    {
        var (s, r, c) = New();
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));
        Assert.Equal(FeedVerdict.Buffered, await s.AcceptAsync(Stored(40, 20, snapshot: true, incarnation: Inc + 1), default));
        Assert.Equal(FeedVerdict.Buffered, await s.AcceptAsync(Stored(40, 21, parent: 20, snapshot: true, incarnation: Inc + 1), default));
        Assert.Single(r.Calls); // nothing applied before the end
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(End(40, 2, incarnation: Inc + 1), default));
        Assert.Equal(["stored a/w Host parent=- n=1 first=10", "cleared a/w all", "stored a/w Host parent=- n=1 first=20", "stored a/w Host parent=20 n=1 first=21"], r.Calls);
        Assert.Equal((40UL, Inc + 1), (s.LastSequence, s.Incarnation));
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(41, 22, parent: 21, incarnation: Inc + 1), default));
        Assert.Equal(1L, c.Snapshots);
    }

    [Fact]
    public async Task Malformed_streams_are_rejected_and_counted_without_touching_the_index()
    {
        var (s, r, c) = New();
        // An event of another node on this node's stream.
        Assert.Equal(FeedVerdict.Malformed, await s.AcceptAsync(Stored(1, 10, node: "b"), default));
        // A snapshot whose end counts other blocks than it listed (a truncated snapshot).
        Assert.Equal(FeedVerdict.Buffered, await s.AcceptAsync(Stored(9, 20, snapshot: true), default));
        Assert.Equal(FeedVerdict.Malformed, await s.AcceptAsync(End(9, 5), default));
        // A live event in the middle of a snapshot.
        Assert.Equal(FeedVerdict.Buffered, await s.AcceptAsync(Stored(9, 20, snapshot: true), default));
        Assert.Equal(FeedVerdict.Malformed, await s.AcceptAsync(Stored(10, 21, parent: 20), default));
        // No tier, no body.
        var noTier = Stored(1, 10);
        noTier.Stored.Tier = V1.Tier.Unspecified;
        Assert.Equal(FeedVerdict.Malformed, await s.AcceptAsync(noTier, default));
        Assert.Equal(FeedVerdict.Malformed, await s.AcceptAsync(new V1.KvEvent { Sequence = 1, Node = "a", Incarnation = Inc }, default));
        Assert.Empty(r.Calls);
        Assert.Equal(5L, c.Malformed);
        Assert.Equal(0UL, s.LastSequence);
        Assert.NotNull(s.LastError);
        // And the stream can still get in line afterwards.
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));
    }

    [Fact]
    public async Task An_empty_snapshot_clears_the_node()
    {
        var (s, r, _) = New();
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(Stored(1, 10), default));
        Assert.Equal(FeedVerdict.Applied, await s.AcceptAsync(End(3, 0), default));
        Assert.Equal(["stored a/w Host parent=- n=1 first=10", "cleared a/w all"], r.Calls);
        Assert.Equal(3UL, s.LastSequence);
    }
}
