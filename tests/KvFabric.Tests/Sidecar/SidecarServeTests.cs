using Grpc.Health.V1;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Sidecar;
using KvFabric.Tests.Rpc;
using Xunit;

namespace KvFabric.Tests.Sidecar;

/// <summary>`kvfabric serve` as an operator runs it: a process, its configuration, its signals.</summary>
[Collection("multi-process")]
public sealed class SidecarServeTests
{
    [Fact]
    public async Task Sigterm_drains_a_call_longer_than_two_seconds_and_cleans_up_before_exiting()
    {
        await using var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1"], TestBlocks.SmallLayoutEnv("sigterm-model"));
        int pid = sidecar.Pid;
        Assert.NotEmpty(Directory.EnumerateFiles("/dev/shm", $"kvfabric-{pid}-*"));
        using var client = new FabricClient(new RpcChannelOptions { Address = new Uri(sidecar.GrpcAddress), Tenant = "dev", Token = "dev" });
        // A health watcher is a call that stays open through the whole drain (Kestrel waits for it up to its 5 s shutdown timeout).
        await using var watch = client.WatchHealth();
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await watch.ReadAsync())?.Status);

        Task<int> stopped = sidecar.StopAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, (await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);
        int code = await stopped;
        Assert.True(code == 0, $"exit code {code} (143: the process was cut off while it drained); log:\n{sidecar.Log}");
        Assert.Empty(Directory.EnumerateFiles("/dev/shm", $"kvfabric-{pid}-*"));
    }
}
