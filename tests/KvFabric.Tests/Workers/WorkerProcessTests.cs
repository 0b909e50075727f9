using System.Diagnostics;
using KvFabric.Rpc.V1;
using KvFabric.Workers.Driver;
using KvFabric.Workers.Model;
using KvFabric.Workers.Serving;
using Xunit;
using Xunit.Abstractions;

namespace KvFabric.Tests.Workers;

/// <summary>
/// Worker processes end to end (`kvfabric-worker serve` started by Deployment, sidecars in this process): disaggregated
/// prefill and decode across processes equal a monolithic run and reuse cached prefixes; nothing leaks (KV blocks,
/// hand-off slots); a decode worker killed mid-run is retried elsewhere or fails with a clear error; a restarted sidecar
/// is reconnected to; a corrupted transfer payload is caught by its checksum and the hand-off retried.
/// Tiny model, small workloads; every wait has a deadline; no timing assertions.
/// </summary>
[Collection("multi-process")]
public sealed class WorkerProcessTests(ITestOutputHelper output)
{
    private static readonly ModelConfig Config = ModelConfigs.Tiny;
    private static readonly TimeSpan StatusDeadline = TimeSpan.FromSeconds(20);

    private static DriverOptions Driver(int maxInFlight = 4, double timeScale = 0) => new()
    {
        MaxInFlight = maxInFlight, TimeScale = timeScale, RequestDeadline = TimeSpan.FromSeconds(90), Label = "test",
    };

    private static Task<Deployment> StartAsync(DeploymentOptions options) =>
        Deployment.StartAsync(options with { Model = "tiny", PinCpus = false, GpuBlocks = 512, HostBlocks = 1024, SsdDirectory = null });

    private static Router RouterOf(Deployment d) => new(d.Prefill, d.Decode, d.IndexClient, Config.ToKvLayout(), "dev");

    /// <summary>8 chats over a shared system prompt (75% of up to 96 tokens), 16 new tokens each.</summary>
    private static IReadOnlyList<WorkloadRequest> Chats(int requests = 8, int promptTokens = 96, int maxNewTokens = 16, ulong seed = 7) =>
        Workloads.SharedPrefixChats(requests, promptTokens, 0.75, 3, maxNewTokens, Config.Vocab, 50, seed);

    private static void AssertAllMatch(IReadOnlyList<RequestResult> results, Dictionary<int, int[]> reference, string what)
    {
        var mismatches = new List<string>();
        int equal = MonolithicCheck.Compare(results, reference, mismatches);
        Assert.True(mismatches.Count == 0 && equal == results.Count, $"{what}: {equal}/{results.Count} equal the monolithic run; {string.Join("; ", mismatches)}");
    }

    private void Report(string label, IReadOnlyList<RequestResult> results)
    {
        output.WriteLine($"{label}: {results.Count(r => r.Ok)}/{results.Count} ok, {results.Count(r => r.Attempts > 1)} retried, reused {Reused(results)} blocks");
        foreach (RequestResult r in results)
            output.WriteLine($"  #{r.Id}: {(r.Ok ? "ok" : "FAILED")} attempts {r.Attempts} prefill {r.PrefillWorker} decode {r.DecodeWorker} e2e {r.E2eMs:0} ms reused {r.Prefill?.ReusedBlocks} hand-off attempts {r.Prefill?.HandoffAttempts} {r.Error}");
    }

    private static long Reused(IReadOnlyList<RequestResult> results) => results.Where(r => r.Ok).Sum(r => (long)(r.Prefill?.ReusedBlocks ?? 0));

    /// <summary>Polls Status until cond holds; fails with the last status (and the worker's output) at the deadline.</summary>
    private static async Task<WorkerStatus> WaitStatusAsync(Deployment d, WorkerClient w, Func<WorkerStatus, bool> cond, string what, TimeSpan? deadline = null)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan limit = deadline ?? StatusDeadline;
        WorkerStatus? last = null;
        Exception? error = null;
        while (clock.Elapsed < limit)
        {
            try
            {
                last = await w.StatusAsync(new KvFabric.Client.Grpc.CallOptions(TimeSpan.FromSeconds(5), CancellationToken.None));
                error = null;
                if (cond(last))
                    return last;
            }
            catch (Exception e) when (e is KvFabric.Client.Grpc.RpcException or OperationCanceledException or TimeoutException)
            {
                error = e;
            }

            await Task.Delay(20);
        }

        string log = d.ProcessOf(w.Name).Log;
        Assert.Fail($"{w.Name}: {what} not reached within {limit.TotalSeconds:0} s; last status {last}; last error {error?.Message}\n--- worker output (tail) ---\n{log[Math.Max(0, log.Length - 4000)..]}");
        return null!;
    }

    /// <summary>Every KV block back in the pool, every hand-off slot free (decode), nothing active.</summary>
    private static Task<WorkerStatus> AssertNoLeaksAsync(Deployment d, WorkerClient w) => WaitStatusAsync(d, w,
        s => s.Active == 0 && s.KvBlocksFree == s.KvBlocksTotal && s.HandoffSlotsFree == s.HandoffSlotsTotal, "no leaked KV blocks or hand-off slots");

    [Fact]
    public async Task Disaggregated_across_processes_matches_the_monolithic_run_reuses_prefixes_and_leaks_nothing()
    {
        IReadOnlyList<WorkloadRequest> workload = Chats();
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { PrefillWorkers = 2, DecodeWorkers = 1 });
        Assert.Equal(2, d.Prefill.Count);
        Assert.Single(d.Decode);
        Router router = RouterOf(d);

        RequestResult[] first = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver());
        AssertAllMatch(first, reference, "first run");
        RequestResult[] second = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver());
        Report("first run", first);
        Report("second run", second);
        AssertAllMatch(second, reference, "second run");

        // The second run's prompts were all prefilled (and offloaded) by the first: their blocks come from the fabric.
        Assert.True(Reused(second) > 0, $"the second run reused no blocks; first run reused {Reused(first)}");
        Assert.All(second, r => Assert.Equal(1, r.Attempts));
        Assert.All(second, r => Assert.Equal(workload[r.Id].Prompt.Length, (int)r.Prefill!.PromptTokens));

        foreach (WorkerClient w in d.Prefill)
        {
            WorkerStatus s = await AssertNoLeaksAsync(d, w);
            Assert.Equal("prefill", s.Role);
            Assert.Equal(0UL, s.Failed);
        }

        WorkerStatus decode = await AssertNoLeaksAsync(d, d.Decode[0]);
        Assert.Equal("decode", decode.Role);
        Assert.True(decode.HandoffSlotsTotal > 0);
        Assert.Equal((ulong)(2 * workload.Count), decode.Completed);
        Assert.Equal(0UL, decode.Failed);
        Assert.Equal(0UL, decode.UnknownNotifications);
        ulong prefilled = 0;
        foreach (WorkerClient w in d.Prefill)
            prefilled += (await w.StatusAsync()).Completed;
        Assert.Equal((ulong)(2 * workload.Count), prefilled);
    }

    [Fact]
    public async Task Colocated_worker_gives_the_same_tokens()
    {
        IReadOnlyList<WorkloadRequest> workload = Chats();
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { ColocatedWorkers = 1 });
        Assert.Single(d.Colocated);

        RequestResult[] first = await RequestDriver.RunColocatedAsync(d.Colocated, workload, Driver());
        AssertAllMatch(first, reference, "colocated, first run");
        RequestResult[] second = await RequestDriver.RunColocatedAsync(d.Colocated, workload, Driver());
        AssertAllMatch(second, reference, "colocated, second run");
        Assert.True(Reused(second) > 0, "the colocated worker's second run reused no blocks");
        WorkerStatus s = await AssertNoLeaksAsync(d, d.Colocated[0]);
        Assert.Equal("colocated", s.Role);
        Assert.Equal((ulong)(2 * workload.Count), s.Completed);
    }

    /// <summary>
    /// Long outputs (prompt of up to 96 tokens + 200 new &lt; 512 positions), arriving over about two seconds so some are
    /// on decode-0 when it is killed and some arrive after (their Reserve then fails): each request is retried on decode-1
    /// (and equals the reference) or fails naming decode-0.
    /// </summary>
    [Fact]
    public async Task Decode_worker_killed_mid_run_requests_are_retried_on_the_other_or_fail_naming_it()
    {
        IReadOnlyList<WorkloadRequest> workload = Workloads.SharedPrefixChats(16, 96, 0.75, 4, 200, Config.Vocab, 8, 11);
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { PrefillWorkers = 1, DecodeWorkers = 2 });
        Router router = RouterOf(d);
        WorkerClient decode0 = d.Decode.Single(w => w.Name == "decode-0");
        WorkerClient decode1 = d.Decode.Single(w => w.Name == "decode-1");

        Task<RequestResult[]> run = RequestDriver.RunDisaggregatedAsync(router, workload, Driver(maxInFlight: 8, timeScale: 1));
        await WaitStatusAsync(d, decode0, s => s.Active > 0, "a request in progress", TimeSpan.FromSeconds(60));
        await d.ProcessOf("decode-0").KillAsync();
        RequestResult[] results = await run.WaitAsync(TimeSpan.FromSeconds(120));
        Report("after killing decode-0", results);

        Assert.Equal(workload.Count, results.Length);
        int retried = 0, failed = 0;
        foreach (RequestResult r in results)
        {
            if (r.Ok)
            {
                Assert.True(reference[r.Id].AsSpan().SequenceEqual(r.Tokens), $"request {r.Id} (attempt {r.Attempts} on {r.DecodeWorker}) differs from the monolithic run");
                if (r.Attempts == 2)
                {
                    retried++;
                    Assert.Equal("decode-1", r.DecodeWorker);
                }
                else
                {
                    Assert.Equal(1, r.Attempts);
                }
            }
            else
            {
                failed++;
                Assert.False(string.IsNullOrWhiteSpace(r.Error));
                Assert.Contains("decode-0", r.Error, StringComparison.Ordinal);
            }
        }

        Assert.True(retried + failed > 0, "killing decode-0 mid-run affected no request");
        await AssertNoLeaksAsync(d, decode1);
        await AssertNoLeaksAsync(d, d.Prefill[0]);
    }

    [Fact]
    public async Task Only_decode_worker_killed_requests_fail_naming_it()
    {
        IReadOnlyList<WorkloadRequest> workload = Workloads.SharedPrefixChats(8, 96, 0.75, 3, 200, Config.Vocab, 8, 13);
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { PrefillWorkers = 1, DecodeWorkers = 1 });
        Router router = RouterOf(d);

        Task<RequestResult[]> run = RequestDriver.RunDisaggregatedAsync(router, workload, Driver(maxInFlight: 8, timeScale: 1));
        await WaitStatusAsync(d, d.Decode[0], s => s.Active > 0, "a request in progress", TimeSpan.FromSeconds(60));
        await d.ProcessOf("decode-0").KillAsync();
        RequestResult[] results = await run.WaitAsync(TimeSpan.FromSeconds(120));
        Report("after killing decode-0", results);

        int failed = 0;
        foreach (RequestResult r in results)
        {
            Assert.Equal(1, r.Attempts); // nowhere to retry
            if (r.Ok)
            {
                Assert.True(reference[r.Id].AsSpan().SequenceEqual(r.Tokens), $"request {r.Id} differs from the monolithic run");
            }
            else
            {
                failed++;
                Assert.Contains("decode worker decode-0", r.Error, StringComparison.Ordinal);
            }
        }

        Assert.True(failed > 0, "killing the only decode worker failed no request");
        await AssertNoLeaksAsync(d, d.Prefill[0]);
    }

    [Fact]
    public async Task Restarted_sidecar_is_reconnected_and_reuse_resumes()
    {
        IReadOnlyList<WorkloadRequest> workload = Chats();
        IReadOnlyList<WorkloadRequest> after = Chats(seed: 21); // another system prompt: nothing of it cached before the restart
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        Dictionary<int, int[]> referenceAfter = MonolithicCheck.Reference(after, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { PrefillWorkers = 1, DecodeWorkers = 1 });
        Router router = RouterOf(d);

        RequestResult[] before = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver());
        AssertAllMatch(before, reference, "before the restart");
        int port = d.Sidecars[0].GrpcEndpoint!.Port;

        await d.RestartSidecarAsync(0, TimeSpan.FromMilliseconds(500));
        Assert.Equal(port, d.Sidecars[0].GrpcEndpoint!.Port);

        RequestResult[] again = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver());
        Report("after the restart", again);
        AssertAllMatch(again, reference, "after the restart");

        // Reuse works again through the new sidecar: a prompt set run twice after the restart reuses on its second run.
        RequestResult[] once = await RequestDriver.RunDisaggregatedAsync(router, after, Driver());
        AssertAllMatch(once, referenceAfter, "new prompts after the restart, first run");
        RequestResult[] twice = await RequestDriver.RunDisaggregatedAsync(router, after, Driver());
        AssertAllMatch(twice, referenceAfter, "new prompts after the restart, second run");
        Assert.True(Reused(twice) > 0, $"no reuse after the sidecar restart (first run reused {Reused(once)})");
        Assert.Contains(twice, r => r.Prefill!.ReusedBlocks * (uint)Config.TokensPerBlock >= r.Prefill.PromptTokens - (uint)Config.TokensPerBlock);

        await AssertNoLeaksAsync(d, d.Prefill[0]);
        await AssertNoLeaksAsync(d, d.Decode[0]);
    }

    /// <summary>Requests while the prefill worker's sidecar is down are computed without the fabric (and still equal the reference).</summary>
    [Fact]
    public async Task Prefill_while_the_sidecar_is_down_computes_without_the_fabric()
    {
        IReadOnlyList<WorkloadRequest> workload = Chats(requests: 4);
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { PrefillWorkers = 1, DecodeWorkers = 1 });
        Router router = RouterOf(d);
        AssertAllMatch(await RequestDriver.RunDisaggregatedAsync(router, workload, Driver()), reference, "before the restart");
        int port = d.Sidecars[0].GrpcEndpoint!.Port;

        // A long downtime (only an upper bound on how long the run below may take to see the sidecar down).
        Task restart = d.RestartSidecarAsync(0, TimeSpan.FromSeconds(3));
        var clock = Stopwatch.StartNew();
        while (await Listening(port))
        {
            Assert.True(clock.Elapsed < TimeSpan.FromSeconds(20), "the sidecar never went down");
            await Task.Delay(10);
        }

        RequestResult[] during = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver(maxInFlight: 1));
        Report("while the sidecar is down", during);
        AssertAllMatch(during, reference, "while the sidecar is down");
        // The first request certainly ran while the sidecar was down (the rest most likely did too, but a slow machine may
        // outlast the downtime, and the new sidecar starts empty).
        Assert.Equal(0U, during[0].Prefill!.ReusedBlocks);
        Assert.Equal((uint)workload[0].Prompt.Length, during[0].Prefill!.ComputedTokens);
        WorkerStatus s = await d.Prefill[0].StatusAsync();
        Assert.True(s.Fallbacks >= 1, $"prefill without the sidecar was not counted as a fallback: {s}");

        await restart.WaitAsync(TimeSpan.FromSeconds(60));
        RequestResult[] after = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver());
        AssertAllMatch(after, reference, "after the restart");
        await AssertNoLeaksAsync(d, d.Prefill[0]);
        await AssertNoLeaksAsync(d, d.Decode[0]);
    }

    private static async Task<bool> Listening(int port)
    {
        using var socket = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
        try
        {
            await socket.ConnectAsync(System.Net.IPAddress.Loopback, port).WaitAsync(TimeSpan.FromSeconds(2));
            return true;
        }
        catch (Exception e) when (e is System.Net.Sockets.SocketException or TimeoutException)
        {
            return false;
        }
    }

    [Theory]
    [InlineData("tcp")]
    [InlineData("shm")]
    public async Task Corrupted_transfer_payload_is_caught_and_the_hand_off_retried(string transfer)
    {
        IReadOnlyList<WorkloadRequest> workload = Chats(requests: 4);
        Dictionary<int, int[]> reference = MonolithicCheck.Reference(workload, Config, threads: 1);
        await using Deployment d = await StartAsync(new DeploymentOptions { PrefillWorkers = 1, DecodeWorkers = 1, CorruptNthPayload = 1, Transfer = transfer });
        Router router = RouterOf(d);

        RequestResult[] results = await RequestDriver.RunDisaggregatedAsync(router, workload, Driver(maxInFlight: 1));
        Report($"corrupted payload over {transfer}", results);
        AssertAllMatch(results, reference, $"corrupted payload over {transfer}");
        Assert.Contains(results, r => r.Prefill!.HandoffAttempts > 1);

        WorkerStatus prefill = await AssertNoLeaksAsync(d, d.Prefill[0]);
        Assert.True(prefill.HandoffRetries >= 1, $"the prefill worker retried no hand-off over {transfer}: {prefill}");
        if (transfer == "tcp")
            Assert.True(prefill.TcpBytesSent > 0, $"nothing went over TCP: {prefill}");
        else
            Assert.True(prefill.ShmBytesWritten > 0, $"nothing went through shared memory: {prefill}");
        WorkerStatus decode = await AssertNoLeaksAsync(d, d.Decode[0]);
        Assert.Equal(0UL, decode.UnknownNotifications);
        Assert.Equal((ulong)workload.Count, decode.Completed);
    }
}
