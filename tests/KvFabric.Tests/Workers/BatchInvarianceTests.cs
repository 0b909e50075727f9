using KvFabric.Workers.Model;
using Xunit;
using static KvFabric.Tests.Workers.ModelTestKit;

namespace KvFabric.Tests.Workers;

// The K/V and logits of a token are the same bit for bit however it was computed.
public sealed class BatchInvarianceTests
{
    private const int Length = 43; // several blocks plus a partial tail for both configs

    [Theory]
    [MemberData(nameof(ConfigNames), MemberType = typeof(ModelTestKit))]
    public void Alone_long_prefill_and_chunked_prefills_give_identical_kv_and_logits(string name)
    {
        ModelConfig config = ByName(name);
        var model = new Transformer(config);
        int[] tokens = Tokens(Length, config.Vocab);
        using var pool = Pool(model);

        // Reference: one long prefill.
        using var full = model.CreateCache(pool);
        float[] fullLogits = model.Prefill(tokens, full);
        byte[] fullBytes = FullBlockBytes(full);
        Assert.Equal(Length / config.TokensPerBlock, full.FullBlocks);

        // Token by token: prefill the first token, then decode one at a time.
        using var alone = model.CreateCache(pool);
        float[] logits = model.Prefill(tokens.AsSpan(0, 1), alone);
        for (int i = 1; i < Length; i++)
        {
            logits = model.DecodeStep(tokens[i], alone);
        }

        Assert.Equal(fullBytes, FullBlockBytes(alone));
        BitEqual(fullLogits, logits);

        // Chunked prefills at boundaries that are not block-aligned.
        foreach (int[] cuts in new[] { new[] { 1, 2, 9, 30 }, new[] { 17 }, new[] { config.TokensPerBlock, 2 * config.TokensPerBlock, 41 } })
        {
            using var chunked = model.CreateCache(pool);
            int start = 0;
            foreach (int cut in cuts.Append(Length))
            {
                logits = model.Prefill(tokens.AsSpan(0, cut), chunked, start);
                start = cut;
            }

            Assert.Equal(fullBytes, FullBlockBytes(chunked));
            BitEqual(fullLogits, logits);
        }
    }

    [Theory]
    [MemberData(nameof(ConfigNames), MemberType = typeof(ModelTestKit))]
    public void Thread_count_and_chunk_size_do_not_change_any_bit(string name)
    {
        ModelConfig config = ByName(name);
        int[] tokens = Tokens(Length, config.Vocab, salt: 3);
        byte[]? expectedBytes = null;
        float[]? expectedLogits = null;
        foreach ((int threads, int chunk) in new[] { (1, config.ChunkTokens), (2, 1), (3, 5), (4, 64) })
        {
            var model = new Transformer(config with { ChunkTokens = chunk }, threads);
            using var pool = Pool(model);
            using var cache = model.CreateCache(pool);
            float[] logits = model.Prefill(tokens, cache);
            byte[] bytes = FullBlockBytes(cache);
            if (expectedBytes is null)
            {
                expectedBytes = bytes;
                expectedLogits = logits;
                continue;
            }

            Assert.Equal(expectedBytes, bytes);
            BitEqual(expectedLogits, logits);
        }
    }

    [Fact]
    public void Parallel_matmul_and_attention_paths_match_one_thread()
    {
        // Big enough that prefill really splits matmuls by tokens and attention by (token, head) across threads.
        ModelConfig config = ModelConfig.Default with { Layers = 1, Vocab = 512, MaxPositions = 512, ChunkTokens = 128 };
        int[] tokens = Tokens(300, config.Vocab, salt: 8);
        byte[]? expectedBytes = null;
        float[]? expectedLogits = null;
        foreach (int threads in new[] { 1, 2, 3 })
        {
            var model = new Transformer(config, threads);
            using var pool = Pool(model, blocks: 128);
            using var cache = model.CreateCache(pool);
            float[] logits = model.Prefill(tokens, cache);
            expectedBytes ??= FullBlockBytes(cache);
            expectedLogits ??= logits;
            Assert.Equal(expectedBytes, FullBlockBytes(cache));
            BitEqual(expectedLogits, logits);

            // The last 40 tokens again, one decode step at a time on top of a shorter prefill.
            using var stepped = model.CreateCache(pool);
            model.Prefill(tokens.AsSpan(0, 260), stepped);
            for (int i = 260; i < tokens.Length; i++)
            {
                logits = model.DecodeStep(tokens[i], stepped);
            }

            Assert.Equal(expectedBytes, FullBlockBytes(stepped));
            BitEqual(expectedLogits, logits);

            // A decode batch of 3 splits its matmuls by output columns; each sequence must match its solo step.
            var solo = new[] { model.CreateCache(pool), model.CreateCache(pool), model.CreateCache(pool) };
            var batch = new[] { model.CreateCache(pool), model.CreateCache(pool), model.CreateCache(pool) };
            try
            {
                for (int s = 0; s < 3; s++)
                {
                    model.Prefill(tokens.AsSpan(0, 20 + (40 * s)), solo[s]);
                    model.Prefill(tokens.AsSpan(0, 20 + (40 * s)), batch[s]);
                }

                var batchLogits = new float[3 * config.Vocab];
                int[] next = [5, 6, 7];
                model.DecodeBatch(next, batch, batchLogits);
                for (int s = 0; s < 3; s++)
                {
                    BitEqual(model.DecodeStep(next[s], solo[s]), batchLogits.AsSpan(s * config.Vocab, config.Vocab));
                }
            }
            finally
            {
                foreach (KvCache c in solo.Concat(batch))
                {
                    c.Dispose();
                }
            }
        }
    }

    [Theory]
    [MemberData(nameof(ConfigNames), MemberType = typeof(ModelTestKit))]
    public void Imported_blocks_continue_exactly_like_the_original(string name)
    {
        ModelConfig config = ByName(name);
        var model = new Transformer(config);
        int[] tokens = Tokens(Length, config.Vocab, salt: 5);
        using var pool = Pool(model);
        using var original = model.CreateCache(pool);
        float[] fullLogits = model.Prefill(tokens, original);
        byte[] bytes = FullBlockBytes(original);
        int blockBytes = (int)model.Layout.BlockBytes;
        int tpb = config.TokensPerBlock;

        // A second model instance (a different worker) imports the blocks from bytes and computes only the rest.
        var other = new Transformer(config);
        using var otherPool = Pool(other);
        using var imported = other.CreateCache(otherPool);
        for (int b = 0; b < original.FullBlocks; b++)
        {
            imported.ImportBlock(b, bytes.AsSpan(b * blockBytes, blockBytes), tokens.AsSpan(b * tpb, tpb));
        }

        Assert.Equal(original.FullBlocks * tpb, imported.Length);
        float[] logits = other.Prefill(tokens, imported, imported.Length);
        BitEqual(fullLogits, logits);
        Assert.Equal(bytes, FullBlockBytes(imported));

        // Both go on decoding the same tokens to the same K/V and logits.
        int[] next = Tokens(12, config.Vocab, salt: 9);
        foreach (int token in next)
        {
            BitEqual(model.DecodeStep(token, original), other.DecodeStep(token, imported));
        }

        Assert.Equal(FullBlockBytes(original), FullBlockBytes(imported));
    }

    [Fact]
    public void Adopted_pool_slots_work_like_imported_blocks()
    {
        ModelConfig config = Tiny;
        var model = new Transformer(config);
        int[] tokens = Tokens(22, config.Vocab, salt: 4);
        int tpb = config.TokensPerBlock;
        using var pool = Pool(model, blocks: 32);
        using var original = model.CreateCache(pool);
        float[] expected = model.Prefill(tokens, original);

        using var adopted = model.CreateCache(pool);
        int inUse = pool.InUse;
        for (int b = 0; b < 3; b++)
        {
            var slot = pool.Rent(); // as a fabric fetch would fill it
            original.ExportBlock(b, slot.AsSpan());
            adopted.AdoptBlock(slot, tokens.AsSpan(b * tpb, tpb));
        }

        Assert.Equal(inUse + 3, pool.InUse);
        BitEqual(expected, model.Prefill(tokens, adopted, adopted.Length));
        Assert.Equal(FullBlockBytes(original), FullBlockBytes(adopted));

        using var otherPool = Pool(model, blocks: 4);
        Assert.Throws<ArgumentException>(() => adopted.AdoptBlock(otherPool.Rent(), tokens.AsSpan(0, tpb)));
        adopted.Dispose();
        Assert.Equal(inUse, pool.InUse);
    }

    [Theory]
    [MemberData(nameof(ConfigNames), MemberType = typeof(ModelTestKit))]
    public void Generation_from_imported_prefix_matches_full_prefill(string name)
    {
        ModelConfig config = ByName(name);
        var model = new Transformer(config);
        int tpb = config.TokensPerBlock;
        int[] prompt = Tokens(4 * tpb, config.Vocab, salt: 11); // block-aligned: the last token is recomputed
        using var pool = Pool(model);

        foreach (Func<Sampler> sampler in new Func<Sampler>[] { Sampler.Greedy, () => Sampler.WithTemperature(0.8f, 42) })
        {
            using var full = model.CreateCache(pool);
            int[] expected = model.Generate(prompt, 16, sampler(), full);

            using var donor = model.CreateCache(pool);
            model.Prefill(prompt.AsSpan(0, 3 * tpb), donor);
            byte[] bytes = FullBlockBytes(donor);

            foreach (int reuseBlocks in new[] { 1, 3 })
            {
                using var cache = model.CreateCache(pool);
                for (int b = 0; b < reuseBlocks; b++)
                {
                    cache.ImportBlock(b, bytes.AsSpan(b * (int)model.Layout.BlockBytes, (int)model.Layout.BlockBytes), prompt.AsSpan(b * tpb, tpb));
                }

                Assert.Equal(expected, model.Generate(prompt, 16, sampler(), cache));
                Assert.Equal(FullBlockBytes(full), FullBlockBytes(cache));
            }

            // All of the prompt's blocks present: only the last token is recomputed for its logits.
            using var whole = model.CreateCache(pool);
            byte[] all = FullBlockBytes(full);
            for (int b = 0; b < 4; b++)
            {
                whole.ImportBlock(b, all.AsSpan(b * (int)model.Layout.BlockBytes, (int)model.Layout.BlockBytes), prompt.AsSpan(b * tpb, tpb));
            }

            Assert.Equal(expected, model.Generate(prompt, 16, sampler(), whole));
        }
    }

    [Theory]
    [MemberData(nameof(ConfigNames), MemberType = typeof(ModelTestKit))]
    public void Decode_batch_matches_one_at_a_time(string name)
    {
        ModelConfig config = ByName(name);
        var model = new Transformer(config);
        using var pool = Pool(model);
        int[] lengths = [1, 9, 23, 5];
        var solo = new KvCache[lengths.Length];
        var batch = new KvCache[lengths.Length];
        try
        {
            for (int s = 0; s < lengths.Length; s++)
            {
                int[] prompt = Tokens(lengths[s], config.Vocab, salt: s);
                solo[s] = model.CreateCache(pool);
                batch[s] = model.CreateCache(pool);
                model.Prefill(prompt, solo[s]);
                model.Prefill(prompt, batch[s]);
            }

            var batchLogits = new float[lengths.Length * config.Vocab];
            for (int step = 0; step < 8; step++)
            {
                int[] next = Tokens(lengths.Length, config.Vocab, salt: 100 + step);
                model.DecodeBatch(next, batch, batchLogits);
                for (int s = 0; s < lengths.Length; s++)
                {
                    BitEqual(model.DecodeStep(next[s], solo[s]), batchLogits.AsSpan(s * config.Vocab, config.Vocab));
                }
            }

            for (int s = 0; s < lengths.Length; s++)
            {
                Assert.Equal(FullBlockBytes(solo[s]), FullBlockBytes(batch[s]));
                Assert.Equal(solo[s].Tokens.ToArray(), batch[s].Tokens.ToArray());
            }
        }
        finally
        {
            foreach (KvCache? c in solo.Concat(batch))
            {
                c?.Dispose();
            }
        }
    }

    [Fact]
    public void Changing_a_later_token_leaves_earlier_kv_untouched()
    {
        ModelConfig config = Tiny;
        var model = new Transformer(config);
        using var pool = Pool(model);
        int[] a = Tokens(24, config.Vocab);
        int[] b = (int[])a.Clone();
        const int Changed = 13;
        b[Changed] = (a[Changed] + 1) % config.Vocab;
        using var ca = model.CreateCache(pool);
        using var cb = model.CreateCache(pool);
        model.Prefill(a, ca);
        model.Prefill(b, cb);
        for (int layer = 0; layer < config.Layers; layer++)
        {
            for (int kv = 0; kv < 2; kv++)
            {
                for (int head = 0; head < config.KvHeads; head++)
                {
                    for (int pos = 0; pos < Changed; pos++)
                    {
                        BitEqual(Element(ca, layer, kv, pos, head), Element(cb, layer, kv, pos, head));
                    }

                    Assert.NotEqual(Element(ca, layer, kv, Changed, head), Element(cb, layer, kv, Changed, head));
                    if (layer > 0)
                    {
                        // From layer 1 on, later positions see the changed token through attention.
                        Assert.NotEqual(Element(ca, layer, kv, 20, head), Element(cb, layer, kv, 20, head));
                    }
                }
            }
        }
    }
}
