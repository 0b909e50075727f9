using System.Runtime.CompilerServices;
using System.Runtime.InteropServices;
using KvFabric.Client;
using KvFabric.Memory;
using KvFabric.Rpc.V1;
using KvFabric.Sidecar;
using KvFabric.Transfer;
using KvFabric.Workers.Decode;
using KvFabric.Workers.Handoff;
using KvFabric.Workers.Model;
using KvFabric.Workers.Prefill;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>
/// Prefill against a real sidecar (onboarding cached prefixes, offloading new blocks), KV handed to a separate decode
/// model through the transfer layer, then generation: the tokens equal a monolithic run with no fabric, and onboarded
/// KV bytes equal recomputed ones.
/// </summary>
public sealed class DisaggregatedTests : IAsyncLifetime
{
    private static readonly ModelConfig Config = ModelConfig.Tiny;
    private readonly Transformer _prefillModel = new(Config, threads: 1);
    private readonly Transformer _decodeModel = new(Config, threads: 1);   // another instance: same seed, same weights
    private readonly Transformer _reference = new(Config, threads: 1);
    private SidecarHost _sidecar = null!;
    private TransferAgent _prefillAgent = null!, _decodeAgent = null!;
    private HostBlockPool _prefillPool = null!, _decodePool = null!, _referencePool = null!;
    private HandoffReceiver _handoff = null!;
    private RemoteAgent _decodeRemote = null!;

    public async Task InitializeAsync()
    {
        _sidecar = new SidecarHost(new SidecarOptions
        {
            Node = "node-p", Port = 0, MetricsPort = -1, Dev = true, Layout = _prefillModel.Layout,
            HostCapacityBytes = 256 * _prefillModel.Layout.BlockBytes, Policy = "lru",
        }, NullLoggerFactory.Instance);
        await _sidecar.StartAsync();
        _prefillAgent = new TransferAgent(new TransferAgentOptions { Name = "prefill" });
        _decodeAgent = new TransferAgent(new TransferAgentOptions { Name = "decode" });
        _prefillPool = _prefillModel.CreatePool(256, shared: true);
        _prefillAgent.Register(_prefillPool);
        _decodePool = _decodeModel.CreatePool(256);
        _referencePool = _reference.CreatePool(256);
        _handoff = new HandoffReceiver(_decodeAgent, (int)_decodeModel.Layout.BlockBytes, 128);
        _decodeRemote = await _prefillAgent.LoadRemoteAsync(_decodeAgent.ExportMetadata());
    }

    public async Task DisposeAsync()
    {
        await _handoff.DisposeAsync();
        await _prefillAgent.DisposeAsync();
        await _decodeAgent.DisposeAsync();
        await _sidecar.DisposeAsync();
        _prefillPool.Dispose();
        _decodePool.Dispose();
        _referencePool.Dispose();
    }

    private static int[] Prompt(int seed, int length, int[]? prefix = null)
    {
        var rng = new Random(seed);
        var tokens = new int[length];
        for (int i = 0; i < length; i++)
            tokens[i] = prefix is not null && i < prefix.Length ? prefix[i] : 1 + rng.Next(Config.Vocab - 1);
        return tokens;
    }

    /// <summary>One request the disaggregated way; returns its tokens and the prefill's outcome.</summary>
    private async Task<(int[] Tokens, PrefillOutcome Outcome)> RunAsync(ulong id, int[] prompt, int maxNew, FabricClient client)
    {
        var prefill = new PrefillEngine(_prefillModel, client, "dev");
        var decode = new DecodeEngine(_decodeModel, _handoff);
        using KvCache prefillCache = _prefillModel.CreateCache(_prefillPool);
        var logits = new float[Config.Vocab];
        HandoffTicket ticket = decode.Reserve(id, prompt.Length, TimeSpan.FromSeconds(30));
        PrefillOutcome outcome = await prefill.PrefillAsync(prompt, prefillCache, logits);
        int full = prompt.Length / Config.TokensPerBlock;
        TransferResult sent;
        using (var source = new HandoffSource(prefillCache, logits, _prefillPool)) // full blocks, the tail, the logits
            sent = await HandoffSender.SendAsync(_prefillAgent, _decodeRemote, ticket, source.Addresses);
        Assert.True(sent.IsSuccess, sent.ToString());

        using KvCache decodeCache = _decodeModel.CreateCache(_decodePool);
        var decodeLogits = new float[Config.Vocab];
        await decode.AcceptAsync(id, prompt, decodeCache, decodeLogits, default);
        Assert.Equal(logits, decodeLogits); // the handed-off logits are the prefill's, bit for bit
        Assert.Equal(prompt.Length, decodeCache.Length);
        for (int i = 0; i < full; i++)
            Assert.True(decodeCache.GetBlock(i).SequenceEqual(prefillCache.GetBlock(i)), $"block {i} differs after the hand-off");
        return (decode.Generate(decodeCache, decodeLogits, maxNew, Sampler.Greedy()), outcome);
    }

    private int[] Monolithic(int[] prompt, int maxNew)
    {
        using KvCache cache = _reference.CreateCache(_referencePool);
        return _reference.Generate(prompt, maxNew, Sampler.Greedy(), cache);
    }

    [Fact]
    public async Task Disaggregated_outputs_equal_the_monolithic_run_with_and_without_prefix_reuse()
    {
        using FabricClient client = FabricClient.Connect($"http://{_sidecar.GrpcEndpoint}", "dev", "dev");
        int[] first = Prompt(1, 37);                      // 9 full blocks of 4 tokens and a 1-token tail
        var (tokens, cold) = await RunAsync(1, first, 12, client);
        Assert.Equal(Monolithic(first, 12), tokens);
        Assert.Equal((0, 37, 9), (cold.ReusedBlocks, cold.ComputedTokens, cold.OffloadedBlocks));

        // Shares 30 tokens (7 full blocks) with the first: those are onboarded from the sidecar, the rest computed.
        int[] second = Prompt(2, 50, prefix: first[..30]);
        var (tokens2, warm) = await RunAsync(2, second, 12, client);
        Assert.Equal(Monolithic(second, 12), tokens2);
        Assert.Equal(7, warm.ReusedBlocks);
        Assert.All(warm.ReusedTiers, t => Assert.Equal(Tier.Host, t));
        Assert.Equal(50 - 28, warm.ComputedTokens);
        Assert.Equal(12 - 7, warm.OffloadedBlocks);

        // A prompt ending on a block boundary, entirely cached: the last token is still computed for its logits.
        int[] third = first[..36];
        var (tokens3, again) = await RunAsync(3, third, 6, client);
        Assert.Equal(Monolithic(third, 6), tokens3);
        Assert.Equal((8, 4), (again.ReusedBlocks, again.ComputedTokens));

        // A prompt shorter than a block: nothing to reuse or hand off, still the same tokens.
        int[] tiny = Prompt(4, 3);
        Assert.Equal(Monolithic(tiny, 5), (await RunAsync(4, tiny, 5, client)).Tokens);
    }

    [Fact]
    public async Task Onboarded_kv_bytes_equal_recomputed_ones()
    {
        using FabricClient client = FabricClient.Connect($"http://{_sidecar.GrpcEndpoint}", "dev", "dev");
        int[] prompt = Prompt(9, 41);
        var prefill = new PrefillEngine(_prefillModel, client, "dev");
        var logits = new float[Config.Vocab];
        using (KvCache warmup = _prefillModel.CreateCache(_prefillPool))
            await prefill.PrefillAsync(prompt, warmup, logits);
        using KvCache onboarded = _prefillModel.CreateCache(_prefillPool);
        PrefillOutcome o = await prefill.PrefillAsync(prompt, onboarded, logits);
        Assert.Equal(10, o.ReusedBlocks);
        using KvCache recomputed = _reference.CreateCache(_referencePool);
        _reference.Prefill(prompt, recomputed);
        for (int i = 0; i < 10; i++)
            Assert.True(onboarded.GetBlock(i).SequenceEqual(recomputed.GetBlock(i)), $"block {i}");
    }
}
