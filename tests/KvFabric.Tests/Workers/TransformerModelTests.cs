using KvFabric.Blocks;
using KvFabric.Workers.Model;
using Xunit;
using static KvFabric.Tests.Workers.ModelTestKit;

namespace KvFabric.Tests.Workers;

public sealed class TransformerModelTests
{
    [Theory]
    [MemberData(nameof(ConfigNames), MemberType = typeof(ModelTestKit))]
    public void Matches_a_double_precision_reference_and_puts_every_element_at_its_layout_offset(string name)
    {
        ModelConfig config = ByName(name);
        var model = new Transformer(config);
        int[] tokens = Tokens(3 * config.TokensPerBlock, config.Vocab, salt: 21);
        using var pool = Pool(model);
        using var cache = model.CreateCache(pool);
        float[] logits = model.Prefill(tokens, cache);

        var reference = new ReferenceModel(config);
        double[] expected = reference.Run(tokens);
        double scale = expected.Max(Math.Abs) + 1;
        for (int i = 0; i < expected.Length; i++)
        {
            Assert.True(Math.Abs(expected[i] - logits[i]) < 1e-3 * scale, $"logit {i}: {logits[i]} vs reference {expected[i]}");
        }

        // Every K and V element, read back through KvLayout.Offset from the exported block bytes.
        for (int layer = 0; layer < config.Layers; layer++)
        {
            for (int pos = 0; pos < tokens.Length; pos++)
            {
                for (int head = 0; head < config.KvHeads; head++)
                {
                    float[] k = Element(cache, layer, 0, pos, head);
                    float[] v = Element(cache, layer, 1, pos, head);
                    for (int i = 0; i < config.HeadDim; i++)
                    {
                        Assert.True(Math.Abs(reference.K[layer][pos][head][i] - k[i]) < 1e-4 * (1 + Math.Abs(k[i])), $"K l{layer} p{pos} h{head} [{i}]");
                        Assert.True(Math.Abs(reference.V[layer][pos][head][i] - v[i]) < 1e-4 * (1 + Math.Abs(v[i])), $"V l{layer} p{pos} h{head} [{i}]");
                    }
                }
            }
        }
    }

    [Fact]
    public void Layout_is_f32_with_a_fingerprint_of_config_and_seed()
    {
        ModelConfig config = Tiny;
        KvLayout layout = new Transformer(config).Layout;
        Assert.Equal(KvDType.F32, layout.DType);
        Assert.Equal(config.Layers, layout.Layers);
        Assert.Equal(config.KvHeads, layout.KvHeads);
        Assert.Equal(config.HeadDim, layout.HeadDim);
        Assert.Equal(config.TokensPerBlock, layout.TokensPerBlock);
        Assert.Equal(2L * config.Layers * config.TokensPerBlock * config.KvHeads * config.HeadDim * 4, layout.BlockBytes);
        Assert.Equal(layout, config.ToKvLayout());
        Assert.NotEqual(layout.Fingerprint, (config with { Seed = 2 }).ToKvLayout().Fingerprint);
        Assert.NotEqual(layout.Fingerprint, (config with { RopeTheta = 500000f }).ToKvLayout().Fingerprint);
        // Settings that change no KV value leave the fingerprint alone.
        Assert.Equal(layout.Fingerprint, (config with { ChunkTokens = 3, MaxPositions = 64 }).ToKvLayout().Fingerprint);
    }

    [Fact]
    public void Same_seed_is_bit_identical_across_instances_and_different_seeds_differ()
    {
        ModelConfig config = Tiny;
        int[] tokens = Tokens(19, config.Vocab);
        float[] Run(ModelConfig c, out byte[] blocks)
        {
            var model = new Transformer(c);
            using var pool = Pool(model);
            using var cache = model.CreateCache(pool);
            float[] logits = model.Prefill(tokens, cache);
            blocks = FullBlockBytes(cache);
            return logits;
        }

        float[] a = Run(config, out byte[] ba);
        float[] b = Run(config, out byte[] bb);
        float[] other = Run(config with { Seed = 99 }, out byte[] bo);
        BitEqual(a, b);
        Assert.Equal(ba, bb);
        Assert.NotEqual(a, other);
        Assert.NotEqual(ba, bo);
    }

    [Fact]
    public void Block_hashes_are_the_project_chain_bound_to_the_model_layout()
    {
        ModelConfig config = Tiny;
        var model = new Transformer(config);
        int[] tokens = Tokens(14, config.Vocab);
        using var pool = Pool(model);
        using var cache = model.CreateCache(pool);
        model.Prefill(tokens, cache);

        var hashes = new BlockHash[8];
        int count = cache.ComputeBlockHashes("tenant-a", hashes);
        Assert.Equal(14 / config.TokensPerBlock, count);
        var expected = new BlockHash[8];
        Assert.Equal(count, BlockHasher.ComputeChain("tenant-a", model.Layout, tokens, expected));
        Assert.Equal(expected.AsSpan(0, count).ToArray(), hashes.AsSpan(0, count).ToArray());

        var before = new BlockHash[8];
        Assert.Equal(count, model.ComputeBlockHashes("tenant-a", tokens, before));
        Assert.Equal(expected, before);

        var otherSeed = new BlockHash[8];
        BlockHasher.ComputeChain("tenant-a", (config with { Seed = 5 }).ToKvLayout(), tokens, otherSeed);
        Assert.NotEqual(expected[0], otherSeed[0]);
        var otherTenant = new BlockHash[8];
        BlockHasher.ComputeChain("tenant-b", model.Layout, tokens, otherTenant);
        Assert.NotEqual(expected[0], otherTenant[0]);
    }

    [Fact]
    public void Cache_rents_one_pool_slot_per_block_and_returns_them()
    {
        ModelConfig config = Tiny;
        var model = new Transformer(config);
        using var pool = Pool(model, blocks: 16);
        using (var cache = model.CreateCache(pool))
        {
            model.Prefill(Tokens(9, config.Vocab), cache);
            Assert.Equal(3, pool.InUse);
            for (int i = 0; i < 7; i++)
            {
                model.DecodeStep(i, cache);
            }

            Assert.Equal(16, cache.Length);
            Assert.Equal(4, pool.InUse);
            cache.Truncate(5);
            Assert.Equal(2, pool.InUse);
            Assert.Equal(1, cache.FullBlocks);
        }

        Assert.Equal(0, pool.InUse);
    }

    [Fact]
    public void A_decode_step_allocates_nothing()
    {
        ModelConfig config = Tiny;
        var model = new Transformer(config);
        using var pool = Pool(model);
        using var cache = model.CreateCache(pool);
        var logits = new float[config.Vocab];
        model.Prefill(Tokens(10, config.Vocab), cache, 0, logits);
        for (int i = 0; i < 40; i++)
        {
            model.DecodeStep(Sampler.ArgMax(logits), cache, logits); // warm up (and cross block boundaries)
        }

        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < 40; i++)
        {
            model.DecodeStep(Sampler.ArgMax(logits), cache, logits);
        }

        Assert.Equal(0, GC.GetAllocatedBytesForCurrentThread() - before);
    }

    [Fact]
    public void Misuse_is_refused_with_a_clear_error()
    {
        ModelConfig config = Tiny;
        var model = new Transformer(config);
        using var pool = Pool(model);
        using var cache = model.CreateCache(pool);
        int[] tokens = Tokens(12, config.Vocab);
        model.Prefill(tokens, cache);
        var block = new byte[model.Layout.BlockBytes];
        cache.ExportBlock(0, block);

        Assert.Throws<ArgumentOutOfRangeException>(() => cache.ExportBlock(3, block)); // only 3 full blocks: 0..2
        using var fresh = model.CreateCache(pool);
        Assert.Throws<ArgumentOutOfRangeException>(() => fresh.ImportBlock(1, block, tokens.AsSpan(4, 4)));
        Assert.Throws<ArgumentException>(() => fresh.ImportBlock(0, block.AsSpan(1), tokens.AsSpan(0, 4)));
        fresh.ImportBlock(0, block, tokens.AsSpan(0, 4));
        Assert.Throws<ArgumentException>(() => fresh.ImportBlock(0, block, tokens.AsSpan(4, 4)));

        // A prefill whose prompt disagrees with the cached prefix, or that skips positions, is refused.
        int[] other = (int[])tokens.Clone();
        other[1] = (other[1] + 1) % config.Vocab;
        Assert.Throws<ArgumentException>(() => model.Prefill(other, fresh, 4));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Prefill(tokens, fresh, 5));
        Assert.Throws<ArgumentOutOfRangeException>(() => model.Prefill([config.Vocab], fresh, 0));
        Assert.Throws<ArgumentException>(() => model.DecodeBatch([1, 2], [fresh, fresh], new float[2 * config.Vocab]));

        var otherModel = new Transformer(config with { Seed = 3 });
        Assert.Throws<ArgumentException>(() => otherModel.Prefill(tokens, fresh, 0));
    }

    [Fact]
    public void Default_config_keeps_activations_sane()
    {
        var model = new Transformer(ModelConfig.Default);
        using var pool = Pool(model, blocks: 8);
        using var cache = model.CreateCache(pool);
        float[] logits = model.Prefill(Tokens(64, ModelConfig.Default.Vocab), cache);
        Assert.All(logits, l => Assert.True(float.IsFinite(l)));
        double mean = logits.Average();
        double std = Math.Sqrt(logits.Average(l => (l - mean) * (l - mean)));
        Assert.InRange(std, 0.05, 20);

        Assert.Equal(32768, model.Layout.BlockBytes);
        int[] generated = model.Generate(Tokens(8, ModelConfig.Default.Vocab), 8, Sampler.Greedy(), cache);
        Assert.All(generated, t => Assert.InRange(t, 0, ModelConfig.Default.Vocab - 1));
        Assert.True(generated.Distinct().Count() > 2, "greedy decoding of the default model should not repeat one token");
    }
}
