// TEMPORARY: replaced by the cluster branch's definitions on merge.
namespace KvFabric.Cluster;

public sealed record NodeInfo(string Node, string Worker, string GrpcEndpoint, byte[] AgentMetadata, double Load, ulong Incarnation);

public enum MembershipChangeKind { Joined, Updated, Left }

public readonly record struct MembershipChange(MembershipChangeKind Kind, NodeInfo Node);

public interface IClusterStore : IAsyncDisposable
{
    string Description { get; }
    Task<IClusterRegistration> RegisterAsync(NodeInfo self, TimeSpan ttl, CancellationToken cancellationToken);
    Task<IReadOnlyList<NodeInfo>> ListAsync(CancellationToken cancellationToken);
    IAsyncEnumerable<MembershipChange> WatchAsync(CancellationToken cancellationToken);
}

public interface IClusterRegistration : IAsyncDisposable
{
    NodeInfo Current { get; }
    Task UpdateAsync(NodeInfo info, CancellationToken cancellationToken);
}
