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
        // A health watcher hears NOT_SERVING before its stream ends (UNAVAILABLE: SidecarShutdownTests); it does not hold the stop.
        await using var watch = client.WatchHealth();
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await watch.ReadAsync())?.Status);

        Task<int> stopped = sidecar.StopAsync(TimeSpan.FromSeconds(60));
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.NotServing, (await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);
        int code = await stopped;
        Assert.True(code == 0, $"exit code {code} (143: the process was cut off while it drained); log:\n{sidecar.Log}");
        Assert.Empty(Directory.EnumerateFiles("/dev/shm", $"kvfabric-{pid}-*"));
    }

    /// <summary>Starts `kvfabric serve` expecting it to refuse; returns what it printed.</summary>
    private static async Task<string> RefusedAsync(string[] args, Dictionary<string, string>? env = null, bool logged = false)
    {
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => ServiceProcess.StartAsync(args, env ?? TestBlocks.SmallLayoutEnv("refused-model")));
        Assert.DoesNotContain("Unhandled exception", e.Message, StringComparison.Ordinal);
        if (!logged) // a failure inside the web host is also in its (structured) error log, with the exception
            Assert.DoesNotContain("   at ", e.Message, StringComparison.Ordinal);
        Assert.Contains("kvfabric serve: ", e.Message, StringComparison.Ordinal);
        return e.Message;
    }

    [Fact]
    public async Task Startup_failures_print_what_to_fix_not_a_stack_trace()
    {
        string dir = Directory.CreateTempSubdirectory("kvfabric-serve-config-").FullName;
        try
        {
            Assert.Contains("--config", await RefusedAsync(["--config", Path.Combine(dir, "missing.json")]), StringComparison.Ordinal);
            string bad = Path.Combine(dir, "bad.json");
            await File.WriteAllTextAsync(bad, "{ \"port\": 0, ");
            Assert.Contains("bad.json", await RefusedAsync(["--config", bad]), StringComparison.Ordinal);
            var env = TestBlocks.SmallLayoutEnv("refused-model");
            env["KVFABRIC_TENANTS__0__NAME"] = "dev";
            env["KVFABRIC_TENANTS__0__TOKEN"] = "other";
            Assert.Contains("--dev", await RefusedAsync(["--dev", "--port", "0", "--metrics-port", "-1"], env), StringComparison.Ordinal);

            using var taken = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
            taken.Start();
            int port = ((System.Net.IPEndPoint)taken.LocalEndpoint).Port;
            Assert.Contains(port.ToString(System.Globalization.CultureInfo.InvariantCulture),
                await RefusedAsync(["--dev", "--port", port.ToString(System.Globalization.CultureInfo.InvariantCulture), "--metrics-port", "-1"], logged: true), StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public async Task A_transfer_port_in_use_fails_construction_without_leaving_a_staging_segment()
    {
        // This collection runs alone, so no other test creates segments of this process meanwhile.
        using var taken = new System.Net.Sockets.TcpListener(System.Net.IPAddress.Loopback, 0);
        taken.Start();
        int port = ((System.Net.IPEndPoint)taken.LocalEndpoint).Port;
        var before = Directory.EnumerateFiles("/dev/shm", $"kvfabric-{Environment.ProcessId}-*").ToHashSet();
        var e = Assert.Throws<KvFabric.Transfer.TransferException>(() => new SidecarHost(new SidecarOptions
        {
            Dev = true, Port = 0, MetricsPort = -1, TransferPort = port, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20,
        }, Microsoft.Extensions.Logging.Abstractions.NullLoggerFactory.Instance));
        Assert.Contains("cannot listen", e.Message, StringComparison.Ordinal);
        Assert.DoesNotContain(Directory.EnumerateFiles("/dev/shm", $"kvfabric-{Environment.ProcessId}-*"), f => !before.Contains(f));

        string refused = await RefusedAsync(["--dev", "--port", "0", "--metrics-port", "-1", "--transfer-port", port.ToString(System.Globalization.CultureInfo.InvariantCulture)]);
        Assert.Contains("could not start", refused, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Json_log_timestamps_marked_Z_are_utc_whatever_the_local_time_zone()
    {
        var env = TestBlocks.SmallLayoutEnv("json-log-model");
        env["TZ"] = "Asia/Tokyo"; // UTC+9, no daylight saving
        if (!File.Exists("/usr/share/zoneinfo/Asia/Tokyo"))
            return; // no tz database: the local zone would be UTC anyway
        await using var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1", "--log-format", "json"], env);
        // The console logger writes from its own thread: the line may follow READY.
        string? line = null;
        for (int i = 0; i < 600 && line is null; i++)
        {
            line = sidecar.Log.Split('\n').FirstOrDefault(l => l.StartsWith('{'));
            if (line is null)
                await Task.Delay(100);
        }

        Assert.True(line is not null, $"no JSON log line; output:\n{sidecar.Log}");
        using var json = System.Text.Json.JsonDocument.Parse(line);
        string stamp = json.RootElement.GetProperty("Timestamp").GetString()!;
        Assert.EndsWith("Z", stamp, StringComparison.Ordinal);
        DateTime logged = DateTime.Parse(stamp, System.Globalization.CultureInfo.InvariantCulture, System.Globalization.DateTimeStyles.AdjustToUniversal);
        // Local time labelled Z is 9 hours off; a slow start is minutes at most.
        Assert.True(Math.Abs((DateTime.UtcNow - logged).TotalHours) < 2, $"logged {stamp}, now {DateTime.UtcNow:O}");
        int code = await sidecar.StopAsync(TimeSpan.FromSeconds(60));
        Assert.True(code == 0, $"exit code {code}; output:\n{sidecar.Log}");
    }

    [Fact]
    public async Task Sigterm_right_after_ready_stops_the_sidecar_cleanly()
    {
        // The signal handler used to be registered only after READY could be printed; a SIGTERM in that window went to
        // the web hosts' console lifetimes alone, which swallow it: the process hung (about one start in two here).
        for (int round = 0; round < 5; round++)
        {
            await using var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "0"], TestBlocks.SmallLayoutEnv("early-sigterm-model"));
            int pid = sidecar.Pid;
            int code = await sidecar.StopAsync(TimeSpan.FromSeconds(30));
            Assert.True(code == 0, $"round {round}: exit code {code} (137: it ignored SIGTERM and was killed); log:\n{sidecar.Log}");
            Assert.Empty(Directory.EnumerateFiles("/dev/shm", $"kvfabric-{pid}-*"));
        }
    }
}
