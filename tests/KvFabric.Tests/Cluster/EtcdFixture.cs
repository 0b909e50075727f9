using KvFabric.Cluster;
using Xunit;

namespace KvFabric.Tests.Cluster;

/// <summary>One etcd shared by the tests of a class (each test uses its own cluster name).</summary>
public sealed class EtcdFixture : IAsyncLifetime
{
    public EtcdProcess Etcd { get; private set; } = null!;

    public async Task InitializeAsync() => Etcd = await EtcdProcess.StartAsync();

    public async Task DisposeAsync()
    {
        if (Etcd is not null)
            await Etcd.DisposeAsync();
    }
}
