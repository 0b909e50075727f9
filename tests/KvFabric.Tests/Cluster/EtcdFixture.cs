using KvFabric.Cluster;
using Xunit;

namespace KvFabric.Tests.Cluster;

/// <summary>
/// One etcd shared by the tests of a class (each test uses its own cluster name). Its data lives in memory: the timing
/// tests measure KvFabric's lease handling, and on a disk shared with the SSD tests etcd's fsyncs (a lease revocation is
/// one) can wait behind their O_DSYNC writes (the killed-node test once took 3.00 s against its 3 s bound in a full run).
/// </summary>
public sealed class EtcdFixture : IAsyncLifetime
{
    public EtcdProcess Etcd { get; private set; } = null!;

    public static string? MemoryRoot => Directory.Exists("/dev/shm") ? "/dev/shm" : null;

    public async Task InitializeAsync() => Etcd = await EtcdProcess.StartAsync(MemoryRoot);

    public async Task DisposeAsync()
    {
        if (Etcd is not null)
            await Etcd.DisposeAsync();
    }
}
