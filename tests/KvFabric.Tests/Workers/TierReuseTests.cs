using KvFabric.Workers.Driver;
using KvFabric.Workers.Model;
using KvFabric.Workers.Serving;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>
/// Prefixes reused from every tier: with memory tiers far smaller than the working set, a second pass over the same
/// prompts finds its blocks demoted to host DRAM and to the SSD tier, onboards them from there, and still produces
/// exactly the monolithic run's tokens.
/// </summary>
[Collection("multi-process")]
public sealed class TierReuseTests : IAsyncLifetime
{
    private static readonly ModelConfig Config = ModelConfigs.Tiny;
    private readonly string _ssd = Path.Combine(Path.GetTempPath(), $"kvfabric-tier-reuse-{Guid.NewGuid():N}");

    public Task InitializeAsync() => Task.CompletedTask;

    public Task DisposeAsync()
    {
        if (Directory.Exists(_ssd))
            Directory.Delete(_ssd, recursive: true);
        return Task.CompletedTask;
    }

    [Fact]
    public async Task A_second_pass_reuses_blocks_from_gpu_host_and_ssd_and_matches_the_monolithic_run()
    {
        // 10 distinct conversations of 96 tokens (24 blocks each): 240 blocks against 8 GPU and 24 host blocks.
        IReadOnlyList<WorkloadRequest> load = Workloads.SharedPrefixChats(10, 96, 0.25, 10, 8, Config.Vocab, 50, 21);
        await using Deployment d = await Deployment.StartAsync(new DeploymentOptions
        {
            Model = "tiny", PinCpus = false, PrefillWorkers = 1, DecodeWorkers = 1, GpuBlocks = 8, HostBlocks = 24, SsdBlocks = 4096, SsdDirectory = _ssd,
        });
        var router = new Router(d.Prefill, d.Decode, d.IndexClient, Config.ToKvLayout(), "dev");
        var options = new DriverOptions { MaxInFlight = 1, TimeScale = 0, RequestDeadline = TimeSpan.FromSeconds(90) };
        RequestResult[] first = await RequestDriver.RunDisaggregatedAsync(router, load, options);
        RequestResult[] second = await RequestDriver.RunDisaggregatedAsync(router, load, options);

        Dictionary<int, int[]> reference = MonolithicCheck.Reference(load, Config, threads: 1);
        var mismatches = new List<string>();
        int equal = MonolithicCheck.Compare(first, reference, mismatches) + MonolithicCheck.Compare(second, reference, mismatches);
        Assert.True(mismatches.Count == 0 && equal == 2 * load.Count, string.Join("; ", mismatches));

        RunSummary s = RunSummary.Of("second pass", second, Config.TokensPerBlock);
        Assert.True(s.ReusedByTier[(int)KvFabric.Rpc.V1.Tier.Ssd] > 0, $"no block was reused from the SSD tier: {s.Line()}");
        Assert.True(s.ReusedByTier[(int)KvFabric.Rpc.V1.Tier.Host] + s.ReusedByTier[(int)KvFabric.Rpc.V1.Tier.Gpu] > 0, $"no block was reused from memory: {s.Line()}");
        // Reuse stops only where the prompt's last token must be computed: all but the last block(s) of each prompt.
        Assert.True(s.ReusedBlocks >= s.PromptBlocks - (2 * load.Count), $"the second pass recomputed what the tiers held: {s.Line()}");
    }
}
