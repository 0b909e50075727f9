using KvFabric.Client;
using KvFabric.Sidecar;
using KvFabric.Workers.Model;
using KvFabric.Workers.Prefill;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Workers;

public sealed class PrefillOffloadTests
{
    [Fact]
    public async Task An_offload_whose_reused_parent_was_evicted_meanwhile_is_an_offload_error_not_a_failed_request()
    {
        ModelConfig config = ModelConfig.Tiny;
        long blockBytes = config.ToKvLayout().BlockBytes;
        await using var host = new SidecarHost(new SidecarOptions
        {
            Port = 0, MetricsPort = -1, Dev = true, Layout = config.ToKvLayout(), HostCapacityBytes = 256 * blockBytes,
        }, NullLoggerFactory.Instance);
        await host.StartAsync();
        using FabricClient sidecar = FabricClient.Connect($"http://{host.GrpcEndpoint}", "dev", "dev");
        var model = new Transformer(config, threads: 1);
        using var pool = model.CreatePool(64);
        var engine = new PrefillEngine(model, sidecar, "dev");
        int tpb = config.TokensPerBlock;
        int[] prompt = [.. Enumerable.Range(1, (4 * tpb) + 1)];
        var logits = new float[config.Vocab];

        // An earlier request stored the prompt's first two blocks.
        using (KvCache earlier = model.CreateCache(pool))
            Assert.Null((await engine.PrefillAsync(prompt.AsMemory(0, (2 * tpb) + 1), earlier, logits)).FabricError);

        // This one reuses them, computes two more, and hands off; before it offloads those, their parent goes (evicted).
        using KvCache cache = model.CreateCache(pool);
        PrefillOutcome outcome = await engine.PrefillAsync(prompt, cache, logits, offload: false);
        Assert.Equal(2, outcome.ReusedBlocks);
        Assert.Equal(1u, (await sidecar.DeleteAsync(outcome.BlockHashes.Slice(16, 16))).Deleted);

        // The request already has its KV: the lost offload is reported, not thrown (which failed the whole request).
        (int stored, string? error) = await engine.OffloadAsync(cache, outcome);
        Assert.Equal(0, stored);
        Assert.NotNull(error);
        Assert.Contains("Put", error, StringComparison.Ordinal);
    }
}
