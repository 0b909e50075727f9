using System.Globalization;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Sidecar;
using KvFabric.Tests.Rpc;
using Xunit;

namespace KvFabric.Tests.Interop;

/// <summary>
/// Interop with gRPC peers no one on this project wrote: Python grpcio drives every RPC of a real `kvfabric serve`
/// process, and our FabricClient calls a grpcio server.
/// </summary>
[Collection("multi-process")]
public sealed class GrpcioInteropTests
{
    private static readonly Dictionary<string, string> SmallLayoutEnv = WithMaxReceive(TestBlocks.SmallLayoutEnv("interop-model"));

    private static Dictionary<string, string> WithMaxReceive(Dictionary<string, string> env)
    {
        env["KVFABRIC_MAX_RECEIVE_MESSAGE"] = "256KiB";
        return env;
    }

    [Fact]
    public async Task Grpcio_client_drives_every_call_of_a_running_sidecar()
    {
        PythonGrpc.RequireGrpcio();
        await using var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "0"], SmallLayoutEnv);
        string address = sidecar.GrpcAddress.Replace("http://", string.Empty, StringComparison.Ordinal);
        var (code, output) = await PythonGrpc.RunAsync(
            ["grpcio_client.py", PythonGrpc.ProtoRoot, address, "dev", "dev", "4096", (256 * 1024).ToString(CultureInfo.InvariantCulture)],
            TimeSpan.FromMinutes(3));
        Assert.True(code == 0, $"grpcio client failed (exit {code}):\n{output}\n--- sidecar log ---\n{sidecar.Log}");
        Assert.Contains("ALL OK", output, StringComparison.Ordinal);
        foreach (string check in new[] { "DEADLINE_EXCEEDED", "CANCELLED", "UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "NOT_FOUND", "UNIMPLEMENTED" })
            Assert.Contains(check, output, StringComparison.Ordinal);

        // The server saw the client's cancellation and the oversized message (metrics, scraped over HTTP).
        using var http = new HttpClient();
        string metrics = await http.GetStringAsync($"http://{sidecar.MetricsAddress}/metrics");
        Assert.Contains("kvfabric_rpc_calls_total{method=\"/kvfabric.v1.Index/SubscribeEvents\",code=\"Cancelled\"}", metrics, StringComparison.Ordinal);
        Assert.Contains("kvfabric_rpc_calls_total{method=\"/kvfabric.v1.Fabric/Put\",code=\"ResourceExhausted\"}", metrics, StringComparison.Ordinal);
        Assert.Equal(0, await sidecar.StopAsync());
    }

    [Fact]
    public async Task A_client_with_no_kvfabric_stubs_finds_and_calls_the_api_through_server_reflection()
    {
        PythonGrpc.RequireGrpcio();
        await using var sidecar = await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1"], SmallLayoutEnv);
        using var client = new FabricClient(new RpcChannelOptions { Address = new Uri(sidecar.GrpcAddress), Tenant = "dev", Token = "dev" });
        var chain = TestBlocks.Chain("reflected", 3);
        Assert.Equal(3u, (await client.PutAsync(TestBlocks.ToPut(chain, 4096, 5))).Stored);

        string address = sidecar.GrpcAddress.Replace("http://", string.Empty, StringComparison.Ordinal);
        var (code, output) = await PythonGrpc.RunAsync(
            ["grpcio_reflection_client.py", PythonGrpc.ProtoRoot, address, "dev", "dev", Convert.ToHexString(TestBlocks.Packed(chain))],
            TimeSpan.FromMinutes(3));
        Assert.True(code == 0, $"reflection client failed (exit {code}):\n{output}\n--- sidecar log ---\n{sidecar.Log}");
        Assert.Contains("OK reflected Lookup: 3 blocks in TIER_HOST", output, StringComparison.Ordinal);
        Assert.Contains("ALL OK", output, StringComparison.Ordinal);
        Assert.Equal(0, await sidecar.StopAsync());
    }

    [Fact]
    public async Task FabricClient_calls_a_grpcio_server()
    {
        PythonGrpc.RequireGrpcio();
        using var server = System.Diagnostics.Process.Start(PythonGrpc.StartInfo(["grpcio_server.py", PythonGrpc.ProtoRoot]))!;
        try
        {
            string? ready = await server.StandardOutput.ReadLineAsync().WaitAsync(TimeSpan.FromSeconds(60));
            if (ready?.StartsWith("READY ", StringComparison.Ordinal) != true)
                Assert.Fail($"grpcio server did not start: {ready} {await ReadErrorAsync(server)}");
            string port = ready.Split(' ')[1];
            using var client = new FabricClient(new RpcChannelOptions
            {
                Address = new Uri($"http://127.0.0.1:{port}"), Tenant = "py", Token = "py-token", DefaultDeadline = TimeSpan.FromSeconds(20),
            });

            Assert.Equal(Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus.Serving, (await client.CheckHealthAsync()).Status);
            var chain = TestBlocks.Chain("to-python", 3);
            PutResponse put = await client.PutAsync(TestBlocks.ToPut(chain, 10_000, 11));   // chunked client stream
            Assert.Equal(3u, put.Stored);
            Assert.Equal(30_000ul, put.BytesReceived);
            Assert.Equal(3u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);
            var dest = new byte[3 * 10_000];
            await client.GetAsync(TestBlocks.Packed(chain), dest, 10_000);             // server stream, gzip-compressed by grpcio
            for (int i = 0; i < 3; i++)
                Assert.Equal(TestBlocks.Bytes(10_000, 11 + i), dest.AsSpan(i * 10_000, 10_000).ToArray());

            var notFound = await Assert.ThrowsAsync<RpcException>(() => client.GetAsync(TestBlocks.Packed(TestBlocks.Chain("nope", 1)), new byte[10_000], 10_000));
            Assert.Equal(StatusCode.NotFound, notFound.Status);
            Assert.Contains("not here", notFound.Detail, StringComparison.Ordinal);

            // The grpcio server's Stats handler sleeps 5 s: our deadline must end the call, on time.
            var started = DateTime.UtcNow;
            var late = await Assert.ThrowsAsync<RpcException>(() => client.StatsAsync(new CallOptions(Deadline: TimeSpan.FromMilliseconds(300))));
            Assert.Equal(StatusCode.DeadlineExceeded, late.Status);
            Assert.True(DateTime.UtcNow - started < TimeSpan.FromSeconds(4), "the deadline did not end the call before the server answered");

            using var wrongToken = new FabricClient(new RpcChannelOptions { Address = new Uri($"http://127.0.0.1:{port}"), Tenant = "py", Token = "bad" });
            Assert.Equal(StatusCode.Unauthenticated, (await Assert.ThrowsAsync<RpcException>(() => wrongToken.LookupAsync(TestBlocks.Packed(chain)))).Status);

            using var cts = new CancellationTokenSource(TimeSpan.FromMilliseconds(200));
            var cancelled = await Assert.ThrowsAsync<RpcException>(() => client.StatsAsync(new CallOptions(CancellationToken: cts.Token)));
            Assert.Equal(StatusCode.Cancelled, cancelled.Status);
        }
        finally
        {
            if (!server.HasExited)
                server.Kill(entireProcessTree: true);
            await server.WaitForExitAsync();
        }
    }

    private static async Task<string> ReadErrorAsync(System.Diagnostics.Process p)
    {
        if (!p.HasExited)
            p.Kill(entireProcessTree: true);
        return await p.StandardError.ReadToEndAsync();
    }
}
