using System.Threading.Channels;
using KvFabric.Blocks;

namespace KvFabric.Tiers;

public enum KvEventKind : byte
{
    // The block is now readable from Tier.
    Stored = 0,
    // The block is no longer held in Tier (evicted, demoted out of it, deleted, or dropped after corruption).
    Removed = 1,
    // Every block of Tier is gone (ClearAsync, when it kept no pinned or in-use block; otherwise it sends a Removed per
    // block it dropped). Block, Parent and Depth are unset; Tenant is 0 (all tenants).
    Cleared = 2,
}

// One placement, move or drop. A move is two events: Stored in the new tier, then Removed from the old one.
// Sequence numbers are per node, start at 1 and have no gaps at the source, so a consumer that sees a gap knows it
// missed events (a full channel) and must resync from TierManager.SnapshotEvents. Parent is meaningful when Depth > 0.
// One event names one block; a put's Stored events come in chain order, with the evictions and write-through copies it
// causes between them (in the order they happened).
public readonly record struct KvEvent(
    ulong Sequence,
    KvEventKind Kind,
    uint Tenant,
    TierKind Tier,
    BlockHash Block,
    BlockHash Parent,
    int Depth)
{
    public bool HasParent => Depth > 0;
}

// Receives events in sequence order. Called while the tier manager holds its metadata lock: it must not block or call
// back into the manager (hand the event to a queue, as KvEventChannel does).
public interface IKvEventSink
{
    void OnEvent(in KvEvent e);
}

// A bounded queue of events for one consumer (the index). When the consumer falls behind by Capacity events, new events
// are dropped and counted rather than stalling the tier manager; the consumer sees the sequence gap and resyncs.
public sealed class KvEventChannel : IKvEventSink
{
    private readonly Channel<KvEvent> _channel;
    private long _dropped;

    public KvEventChannel(int capacity = 65536)
    {
        if (capacity <= 0)
            throw new ArgumentOutOfRangeException(nameof(capacity), capacity, "an event channel needs a positive capacity (events buffered for a slow consumer)");
        Capacity = capacity;
        _channel = Channel.CreateBounded<KvEvent>(new BoundedChannelOptions(capacity)
        {
            FullMode = BoundedChannelFullMode.Wait, // TryWrite fails instead of waiting; the drop is counted below
            SingleReader = true,
            SingleWriter = true,
        });
    }

    public int Capacity { get; }
    public ChannelReader<KvEvent> Reader => _channel.Reader;
    public long Dropped => Interlocked.Read(ref _dropped);

    public void OnEvent(in KvEvent e)
    {
        if (!_channel.Writer.TryWrite(e))
            Interlocked.Increment(ref _dropped);
    }

    public void Complete() => _channel.Writer.TryComplete();
}
