using System.Diagnostics;
using KvFabric.Client.Grpc;
using KvFabric.Memory;
using KvFabric.Rpc.V1;
using KvFabric.Sidecar;
using KvFabric.Transfer;
using KvFabric.Workers.Driver;
using KvFabric.Workers.Handoff;
using KvFabric.Workers.Model;
using KvFabric.Workers.Serving;
using Xunit;
using Xunit.Abstractions;

namespace KvFabric.Tests.Workers;

/// <summary>
/// Graceful shutdown of a `kvfabric-worker serve` process (SIGTERM): new calls are refused with UNAVAILABLE saying it is
/// shutting down; a stream in flight gets the drain period to finish; one still running after it ends with UNAVAILABLE,
/// never CANCELLED; and the driver takes a rolling restart of a decode worker without failing a request. The KV is handed
/// off by a transfer agent in this process (zero bytes: the tokens are meaningless, their count is what matters), so no
/// step of these tests depends on timing; every wait has a deadline.
/// </summary>
[Collection("multi-process")]
public sealed class WorkerDrainTests(ITestOutputHelper output) : IAsyncLifetime
{
    private static readonly int Tpb = ModelConfigs.Tiny.TokensPerBlock;
    private static readonly int[] Prompt = [.. Enumerable.Range(1, 2 * Tpb + 1)];
    private static readonly CallOptions Call = new(TimeSpan.FromSeconds(60), CancellationToken.None);
    private TransferAgent _sender = null!;
    private HostBlockPool _blocks = null!;

    public Task InitializeAsync()
    {
        _sender = new TransferAgent(new TransferAgentOptions { Name = "prefill-test" });
        _blocks = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = checked((int)ModelConfigs.Tiny.ToKvLayout().BlockBytes), SlotCount = 4, Tag = "test-kv" });
        _sender.Register(_blocks);
        return Task.CompletedTask;
    }

    public async Task DisposeAsync()
    {
        await _sender.DisposeAsync();
        _blocks.Dispose();
    }

    private static Task<ServiceProcess> StartDecodeAsync(string name, double drainSeconds, int stepDelayMs = 0) =>
        ServiceProcess.StartAsync("kvfabric-worker.dll", "serve",
        [
            "--role", "decode", "--name", name, "--port", "0", "--model", "tiny", "--kv-blocks", "256", "--handoff-slots", "512",
            "--drain-seconds", drainSeconds.ToString(System.Globalization.CultureInfo.InvariantCulture),
            "--decode-step-delay-ms", stepDelayMs.ToString(System.Globalization.CultureInfo.InvariantCulture),
        ]);

    /// <summary>WRITEs (zero) bytes into every slot of the reservation, with its notification: the KV has arrived.</summary>
    private async Task SendKvAsync(HandoffReservation t)
    {
        RemoteAgent receiver = await _sender.LoadRemoteAsync(t.AgentMetadata.Memory);
        var ticket = new HandoffTicket(t.RequestId, t.Nonce, new Guid(t.ReceiverAgent.Span), [.. t.Addresses], (int)t.BlockBytes, TimeSpan.FromMilliseconds(t.LeaseMs));
        TransferResult sent = await HandoffSender.SendAsync(_sender, receiver, ticket, t.Addresses.Select(_ => _blocks.SlotAt(0).Address).ToArray(), backend: BackendKind.Tcp);
        Assert.True(sent.IsSuccess, sent.ToString());
    }

    private static DecodeRequest Decode(ulong id, int maxNew)
    {
        var request = new DecodeRequest { RequestId = id, MaxNewTokens = (uint)maxNew };
        request.Prompt.Add(Prompt);
        return request;
    }

    private static async Task WaitActiveAsync(WorkerClient client, uint active)
    {
        var clock = Stopwatch.StartNew();
        while ((await client.StatusAsync(Call)).Active != active)
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), $"{client.Name} never had {active} call(s) active");
            await Task.Delay(20);
        }
    }

    /// <summary>Reserves under fresh ids until the worker refuses (it handles SIGTERM asynchronously); the refusal.</summary>
    private static async Task<RpcException> RefusedReserveAsync(WorkerClient client)
    {
        var clock = Stopwatch.StartNew();
        for (ulong id = 1000; ; id++)
        {
            try
            {
                await client.ReserveAsync(id, Prompt.Length, Call);
            }
            catch (RpcException e)
            {
                return e;
            }

            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(30), "the worker still took new reservations 30 s after SIGTERM");
            await Task.Delay(20);
        }
    }

    [Fact]
    public async Task A_health_watch_hears_not_serving_then_ends_unavailable_and_does_not_hold_the_stop()
    {
        await using ServiceProcess worker = await StartDecodeAsync("drain-watch", drainSeconds: 120);
        using var client = new WorkerClient("drain-watch", worker.GrpcAddress, "dev", "dev");
        await using var watch = client.Channel.ServerStreaming<Grpc.Health.V1.HealthCheckRequest, Grpc.Health.V1.HealthCheckResponse>(
            "/grpc.health.v1.Health/Watch", new Grpc.Health.V1.HealthCheckRequest(), Grpc.Health.V1.HealthCheckResponse.Parser, Call);
        Assert.Equal(Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus.Serving, (await watch.ReadAsync())?.Status);

        Task<int> stopped = worker.StopAsync(TimeSpan.FromSeconds(150));
        Assert.Equal(Grpc.Health.V1.HealthCheckResponse.Types.ServingStatus.NotServing, (await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)))?.Status);
        // Ended by the worker with a status that says where to go (not cut off when the server stops under it).
        RpcException e = await Assert.ThrowsAsync<RpcException>(async () => await watch.ReadAsync().AsTask().WaitAsync(TimeSpan.FromSeconds(30)));
        Assert.Equal(StatusCode.Unavailable, e.Status);
        Assert.Contains("worker drain-watch is shutting down: this stream (/grpc.health.v1.Health/Watch) ended", e.Detail, StringComparison.Ordinal);
        Assert.Equal(0, await stopped.WaitAsync(TimeSpan.FromSeconds(60)));
    }

    [Fact]
    public async Task A_stopping_decode_worker_refuses_new_calls_and_lets_a_stream_in_flight_finish()
    {
        await using ServiceProcess worker = await StartDecodeAsync("drain-finish", drainSeconds: 120);
        using var client = new WorkerClient("drain-finish", worker.GrpcAddress, "dev", "dev");
        HandoffReservation ticket = (await client.ReserveAsync(1, Prompt.Length, Call)).Ticket;
        Task<int> tokens = Task.Run(async () =>
        {
            int n = 0;
            await using var stream = client.Decode(Decode(1, 8), Call);
            while (await stream.ReadAsync() is { } m)
                n += m.Tokens.Count;
            return n;
        });
        await WaitActiveAsync(client, 1); // the Decode waits for its KV

        Task<int> stopped = worker.StopAsync(TimeSpan.FromSeconds(150));
        RpcException refused = await RefusedReserveAsync(client);
        Assert.Equal(StatusCode.Unavailable, refused.Status);
        Assert.Contains("shutting down", refused.Detail, StringComparison.Ordinal);
        Assert.Contains("retry on another worker", refused.Detail, StringComparison.Ordinal);
        await using (var late = client.Decode(Decode(2, 8), Call))
        {
            RpcException e = await Assert.ThrowsAsync<RpcException>(async () => await late.ReadAsync());
            Assert.Equal(StatusCode.Unavailable, e.Status);
            Assert.Contains("shutting down", e.Detail, StringComparison.Ordinal);
        }

        // The stream in flight still gets its KV and all its tokens; only then does the worker exit (0: a clean stop).
        // Held past 2 s first: System.CommandLine used to cut a stop off after 2 s (exit 143), whatever was in flight.
        await Task.Delay(TimeSpan.FromSeconds(3));
        Assert.False(stopped.IsCompleted, $"the worker stopped with a stream in flight; log:\n{worker.Log}");
        await SendKvAsync(ticket);
        Assert.Equal(8, await tokens.WaitAsync(TimeSpan.FromSeconds(60)));
        Assert.Equal(0, await stopped.WaitAsync(TimeSpan.FromSeconds(60)));
    }

    [Fact]
    public async Task A_stream_longer_than_the_drain_period_ends_unavailable_not_cancelled()
    {
        // 300 tokens at 20 ms a step take about 6 s (more on a busy machine); the drain period is 0.5 s.
        await using ServiceProcess worker = await StartDecodeAsync("drain-cut", drainSeconds: 0.5, stepDelayMs: 20);
        using var client = new WorkerClient("drain-cut", worker.GrpcAddress, "dev", "dev");
        HandoffReservation ticket = (await client.ReserveAsync(1, Prompt.Length, Call)).Ticket;
        await SendKvAsync(ticket);
        await using var stream = client.Decode(Decode(1, 300), Call);
        int got = (await stream.ReadAsync())!.Tokens.Count;

        Task<int> stopped = worker.StopAsync(TimeSpan.FromSeconds(60));
        RpcException? error = null;
        try
        {
            while (await stream.ReadAsync() is { } m)
                got += m.Tokens.Count;
        }
        catch (RpcException e)
        {
            error = e;
        }

        Assert.True(error is not null, $"the stream finished all {got} tokens: the drain period did not end it; log:\n{worker.Log}");
        Assert.Equal(StatusCode.Unavailable, error.Status);
        Assert.Contains("drain period", error.Detail, StringComparison.Ordinal);
        Assert.Contains("retry on another worker", error.Detail, StringComparison.Ordinal);
        Assert.InRange(got, 1, 299);
        Assert.Equal(0, await stopped.WaitAsync(TimeSpan.FromSeconds(60)));
    }

    /// <summary>
    /// A rolling restart: decode-0 is stopped (SIGTERM) while requests run. Those it serves finish within its drain; those
    /// routed to it after are refused (UNAVAILABLE before any token) and retried on decode-1. None fails.
    /// </summary>
    [Fact]
    public async Task A_decode_worker_stopped_mid_run_fails_no_request()
    {
        ModelConfig config = ModelConfigs.Tiny;
        IReadOnlyList<WorkloadRequest> workload = Workloads.SharedPrefixChats(16, 96, 0.75, 4, 100, config.Vocab, 8, 17);
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, config, threads: 1);
        await using Deployment d = await Deployment.StartAsync(new DeploymentOptions
        {
            PrefillWorkers = 1, DecodeWorkers = 2, Model = "tiny", PinCpus = false, GpuBlocks = 512, HostBlocks = 1024, SsdDirectory = null,
        });
        var router = new Router(d.Prefill, d.Decode, d.IndexClient, config.ToKvLayout(), "dev");
        WorkerClient decode0 = d.Decode.Single(w => w.Name == "decode-0");

        Task<RequestResult[]> run = RequestDriver.RunDisaggregatedAsync(router, workload,
            new DriverOptions { MaxInFlight = 8, TimeScale = 1, RequestDeadline = TimeSpan.FromSeconds(90), Label = "test" });
        await WaitActiveAsync(decode0, 1);
        int code = await d.ProcessOf("decode-0").StopAsync(TimeSpan.FromSeconds(60));
        RequestResult[] results = await run.WaitAsync(TimeSpan.FromSeconds(120));
        foreach (RequestResult r in results)
            output.WriteLine($"#{r.Id}: {(r.Ok ? "ok" : "FAILED")} attempts {r.Attempts} decode {r.DecodeWorker} {r.Error}");

        Assert.Equal(0, code);
        Assert.All(results, r => Assert.True(r.Ok, $"request {r.Id} failed: {r.Error}"));
        Assert.All(results, r => Assert.True(reference[r.Id].AsSpan().SequenceEqual(r.Tokens), $"request {r.Id} differs from the monolithic run"));
        Assert.All(results.Where(r => r.Attempts > 1), r => Assert.Equal("decode-1", r.DecodeWorker));
    }
}
