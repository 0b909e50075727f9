using System.Runtime.CompilerServices;
using System.Threading.Channels;

namespace KvFabric.Cluster;

/// <summary>
/// A node of the cluster as published in the cluster store, under /kvfabric/&lt;cluster&gt;/nodes/&lt;node&gt;. The value is
/// JSON (see <see cref="NodeInfoCodec"/> and docs/cluster.md).
/// </summary>
/// <param name="Node">The node's name, unique in its cluster; no '/'.</param>
/// <param name="Worker">The inference worker the node serves (free-form, e.g. "prefill-0").</param>
/// <param name="GrpcEndpoint">Where the node's KvFabric gRPC service listens, "host:port".</param>
/// <param name="AgentMetadata">The node's transfer-agent metadata (opaque to the store).</param>
/// <param name="Load">The node's current load (finite; meaning is the publisher's).</param>
/// <param name="Incarnation">Changes when the node restarts, so peers can tell a restarted node from a continuing one.</param>
public sealed record NodeInfo(string Node, string Worker, string GrpcEndpoint, byte[] AgentMetadata, double Load, ulong Incarnation)
{
    /// <summary>Same content (the record's own equality compares AgentMetadata by reference).</summary>
    public bool SameAs(NodeInfo? other) =>
        other is not null && Node == other.Node && Worker == other.Worker && GrpcEndpoint == other.GrpcEndpoint
        && AgentMetadata.AsSpan().SequenceEqual(other.AgentMetadata) && Load.Equals(other.Load) && Incarnation == other.Incarnation;
}

public enum MembershipChangeKind
{
    Joined,
    Updated,
    Left,
}

/// <summary>A change of the membership. For Left, Node carries the last known info of the node that left.</summary>
public readonly record struct MembershipChange(MembershipChangeKind Kind, NodeInfo Node);

/// <summary>Where a cluster's nodes publish themselves and find each other (in-process, or etcd).</summary>
public interface IClusterStore : IAsyncDisposable
{
    /// <summary>What the store is, for logs and errors: "etcd at http://127.0.0.1:2379 (cluster c)", "in-process (cluster c)".</summary>
    string Description { get; }

    /// <summary>
    /// Puts <paramref name="self"/> under a lease of <paramref name="ttl"/> and keeps the lease alive in the background
    /// (a keepalive every ttl/3) until the registration is disposed, which revokes the lease: the node leaves at once. A
    /// lease that was lost (it expired while the store was unreachable) is replaced automatically, and that is logged.
    /// </summary>
    Task<IClusterRegistration> RegisterAsync(NodeInfo self, TimeSpan ttl, CancellationToken cancellationToken);

    /// <summary>The current members, ordered by node name.</summary>
    Task<IReadOnlyList<NodeInfo>> ListAsync(CancellationToken cancellationToken);

    /// <summary>
    /// The current members as Joined, then the changes as they happen, until cancelled (then it throws
    /// OperationCanceledException). Survives reconnects of the store: after one it lists again, emits the differences and
    /// watches on.
    /// </summary>
    IAsyncEnumerable<MembershipChange> WatchAsync(CancellationToken cancellationToken);
}

/// <summary>A node's presence in the store; disposing it takes the node out at once.</summary>
public interface IClusterRegistration : IAsyncDisposable
{
    /// <summary>What is published now.</summary>
    NodeInfo Current { get; }

    /// <summary>Publishes new info (e.g. a new load or new metadata) under the same lease; the node name must not change.</summary>
    Task UpdateAsync(NodeInfo info, CancellationToken cancellationToken);
}

/// <summary>The cluster store cannot be reached; the message names it and says how to get it running.</summary>
public sealed class ClusterStoreUnavailableException : Exception
{
    public ClusterStoreUnavailableException(string message, Exception? inner = null) : base(message, inner)
    {
    }
}

/// <summary>A watcher fell so far behind that its changes no longer fit its bounded queue; watch again (a fresh listing).</summary>
public sealed class WatchOverflowException(string message) : Exception(message);

/// <summary>How both stores hand a watch's changes to its caller.</summary>
internal static class WatchChannel
{
    /// <summary>Changes a watcher may have pending; one that falls further behind gets <see cref="WatchOverflowException"/>.</summary>
    public const int Capacity = 4096;

    /// <summary>A bounded queue for one watcher's changes (writes never wait: see <see cref="Emit"/>).</summary>
    public static Channel<MembershipChange> Create(bool singleWriter) =>
        Channel.CreateBounded<MembershipChange>(new BoundedChannelOptions(Capacity) { SingleReader = true, SingleWriter = singleWriter });

    /// <summary>Queues a change; when the watcher's queue is full, ends its watch with WatchOverflowException (the
    /// watcher lists again from scratch) and returns false. A watch already ended takes nothing.</summary>
    public static bool Emit(ChannelWriter<MembershipChange> writer, MembershipChange change, string store)
    {
        if (writer.TryWrite(change))
            return true;
        writer.TryComplete(new WatchOverflowException(
            $"the watcher of {store} fell {Capacity} membership changes behind; its watch ended: watch again for a fresh listing"));
        return false;
    }

    /// <summary>
    /// Yields the channel's changes until it completes (rethrowing a failure it was completed with), the caller cancels
    /// (OperationCanceledException), or the store is disposed (the watch just ends).
    /// </summary>
    public static async IAsyncEnumerable<MembershipChange> ReadAsync(ChannelReader<MembershipChange> changes,
        [EnumeratorCancellation] CancellationToken caller, CancellationToken disposed = default)
    {
        using var both = CancellationTokenSource.CreateLinkedTokenSource(caller, disposed);
        while (true)
        {
            bool more;
            try
            {
                more = await changes.WaitToReadAsync(both.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (disposed.IsCancellationRequested && !caller.IsCancellationRequested)
            {
                yield break; // the store was disposed: the watch ends
            }

            if (!more)
                yield break;
            while (changes.TryRead(out MembershipChange change))
                yield return change;
        }
    }
}
