using System.Runtime.CompilerServices;
using KvFabric.Blocks;
using KvFabric.Memory;

namespace KvFabric.Workers.Model;

/// <summary>
/// A small decoder-only transformer (Llama-style: RMSNorm, grouped-query attention with rotary embeddings, SwiGLU)
/// running in float32 on the CPU, with weights generated from <see cref="ModelConfig.Seed"/>. Its KV cache lives in
/// fabric blocks (<see cref="KvCache"/>). Every kernel is batch-invariant: the K, V and logits of a token are the same
/// bit for bit however the tokens around it are batched, chunked or reloaded (docs/workers-model.md).
/// One call runs at a time per instance (calls are serialised); it parallelises across tokens and heads inside a call.
/// </summary>
public sealed unsafe class Transformer
{
    private readonly ModelConfig _c;
    private readonly ModelWeights _w;
    private readonly int _workers;
    private readonly int _half;
    private readonly float[] _cos;
    private readonly float[] _sin;
    private readonly float[] _x, _xn, _q, _k, _v, _att, _o, _gate, _up, _scores;
    private readonly KvCache?[] _rowCache;
    private readonly int[] _rowPos;
    private readonly int[] _rowToken;
    private readonly Lock _lock = new();

    public Transformer(ModelConfig config, int threads = 0)
    {
        ArgumentNullException.ThrowIfNull(config);
        config.Validate();
        ArgumentOutOfRangeException.ThrowIfNegative(threads);
        _c = config;
        Layout = config.ToKvLayout();
        _w = new ModelWeights(config);
        _workers = threads == 0 ? Math.Max(1, Environment.ProcessorCount) : threads;

        _half = config.HeadDim / 2;
        _cos = Pinned(checked(config.MaxPositions * _half));
        _sin = Pinned(_cos.Length);
        for (int i = 0; i < _half; i++)
        {
            double invFreq = Math.Pow(config.RopeTheta, -2.0 * i / config.HeadDim);
            for (int p = 0; p < config.MaxPositions; p++)
            {
                double angle = p * invFreq;
                _cos[(p * _half) + i] = (float)Math.Cos(angle);
                _sin[(p * _half) + i] = (float)Math.Sin(angle);
            }
        }

        int rows = config.ChunkTokens;
        _x = Pinned(rows * config.DModel);
        _xn = Pinned(rows * config.DModel);
        _o = Pinned(rows * config.DModel);
        _q = Pinned(rows * config.QDim);
        _att = Pinned(rows * config.QDim);
        _k = Pinned(rows * config.KvDim);
        _v = Pinned(rows * config.KvDim);
        _gate = Pinned(rows * config.Ffn);
        _up = Pinned(rows * config.Ffn);
        _scores = Pinned(checked(_workers * config.GroupSize * config.MaxPositions));
        _rowCache = new KvCache?[rows];
        _rowPos = new int[rows];
        _rowToken = new int[rows];
    }

    public ModelConfig Config => _c;

    /// <summary>The fabric layout of this model's KV blocks (F32, model fingerprint from the config and seed).</summary>
    public KvLayout Layout { get; }

    public int Threads => _workers;

    /// <summary>A host pool whose slots are this model's blocks.</summary>
    public HostBlockPool CreatePool(int blocks, bool shared = false) => new(new HostBlockPoolOptions
    {
        SlotBytes = checked((int)Layout.BlockBytes),
        SlotCount = blocks,
        Shared = shared,
        Tag = "kvmodel",
    });

    public KvCache CreateCache(HostBlockPool pool) => new(Layout, pool, _c.MaxPositions);

    /// <summary>
    /// The chained hashes (spec v1) of the full blocks of <paramref name="tokens"/> under this model's layout: what a
    /// worker looks up in the fabric before prefilling, and what <see cref="KvCache.ComputeBlockHashes"/> gives after.
    /// </summary>
    public int ComputeBlockHashes(string tenantNamespace, ReadOnlySpan<int> tokens, Span<BlockHash> destination) =>
        BlockHasher.ComputeChain(tenantNamespace, Layout, tokens, destination);

    /// <summary>
    /// Computes positions <paramref name="startPosition"/> to tokens.Length - 1 of the sequence <paramref name="tokens"/>,
    /// reusing the K/V of positions before startPosition already in <paramref name="cache"/> (computed or imported;
    /// their tokens must match), and writes the last token's logits. Cache entries at or after startPosition are dropped.
    /// </summary>
    public void Prefill(ReadOnlySpan<int> tokens, KvCache cache, int startPosition, Span<float> logits)
    {
        ArgumentNullException.ThrowIfNull(cache);
        CheckCache(cache);
        CheckLogits(logits, 1);
        CheckTokens(tokens);
        if (startPosition < 0 || startPosition >= tokens.Length)
        {
            throw new ArgumentOutOfRangeException(
                nameof(startPosition), startPosition, $"startPosition must be in 0 to {tokens.Length - 1}: at least the last token is computed.");
        }

        if (startPosition > cache.Length)
        {
            throw new ArgumentOutOfRangeException(
                nameof(startPosition), startPosition, $"The cache holds only {cache.Length} positions; startPosition can be at most that.");
        }

        if (tokens.Length > cache.MaxTokens || tokens.Length > _c.MaxPositions)
        {
            throw new ArgumentException($"{tokens.Length} tokens exceed the model's {_c.MaxPositions} positions or the cache's {cache.MaxTokens}.", nameof(tokens));
        }

        if (!cache.Tokens[..startPosition].SequenceEqual(tokens[..startPosition]))
        {
            throw new ArgumentException("The cache's tokens before startPosition differ from the prompt's.", nameof(tokens));
        }

        lock (_lock)
        {
            try
            {
                PrefillLocked(tokens, cache, startPosition, logits);
            }
            finally
            {
                Array.Clear(_rowCache);
            }
        }
    }

    private void PrefillLocked(ReadOnlySpan<int> tokens, KvCache cache, int startPosition, Span<float> logits)
    {
        cache.Truncate(startPosition);
        int chunk = _c.ChunkTokens;
        for (int s = startPosition; s < tokens.Length; s += chunk)
        {
            int e = Math.Min(tokens.Length, s + chunk);
            cache.Reserve(e);
            for (int r = 0; r < e - s; r++)
            {
                _rowCache[r] = cache;
                _rowPos[r] = s + r;
                _rowToken[r] = tokens[s + r];
            }

            bool last = e == tokens.Length;
            fixed (float* pl = logits)
            {
                Forward(e - s, last ? e - s - 1 : -1, last ? pl : null);
            }

            cache.Commit(tokens[s..e], s);
        }
    }

    public float[] Prefill(ReadOnlySpan<int> tokens, KvCache cache, int startPosition = 0)
    {
        var logits = new float[_c.Vocab];
        Prefill(tokens, cache, startPosition, logits);
        return logits;
    }

    /// <summary>Appends one token to the sequence and writes its logits. Allocates nothing.</summary>
    public void DecodeStep(int token, KvCache cache, Span<float> logits)
    {
        ArgumentNullException.ThrowIfNull(cache);
        DecodeBatch(new ReadOnlySpan<int>(in token), new ReadOnlySpan<KvCache>(in cache), logits);
    }

    public float[] DecodeStep(int token, KvCache cache)
    {
        var logits = new float[_c.Vocab];
        DecodeStep(token, cache, logits);
        return logits;
    }

    /// <summary>
    /// One decode step for several sequences at once (continuous batching): sequence i appends tokens[i] to caches[i]
    /// and gets its logits in logits[i*Vocab, (i+1)*Vocab). Bit-identical to calling <see cref="DecodeStep(int, KvCache, Span{float})"/>
    /// for each sequence alone. The caches must be distinct.
    /// </summary>
    public void DecodeBatch(ReadOnlySpan<int> tokens, ReadOnlySpan<KvCache> caches, Span<float> logits)
    {
        if (tokens.Length != caches.Length)
        {
            throw new ArgumentException($"{tokens.Length} tokens for {caches.Length} caches.", nameof(caches));
        }

        CheckTokens(tokens);
        CheckLogits(logits, tokens.Length);
        for (int i = 0; i < caches.Length; i++)
        {
            ArgumentNullException.ThrowIfNull(caches[i], nameof(caches));
            CheckCache(caches[i]);
            if (caches[i].Length >= Math.Min(_c.MaxPositions, caches[i].MaxTokens))
            {
                throw new InvalidOperationException($"Sequence {i} is full ({caches[i].Length} tokens).");
            }

            for (int j = 0; j < i; j++)
            {
                if (ReferenceEquals(caches[i], caches[j]))
                {
                    throw new ArgumentException($"caches[{j}] and caches[{i}] are the same cache.", nameof(caches));
                }
            }
        }

        lock (_lock)
        {
            try
            {
                DecodeBatchLocked(tokens, caches, logits);
            }
            finally
            {
                Array.Clear(_rowCache);
            }
        }
    }

    private void DecodeBatchLocked(ReadOnlySpan<int> tokens, ReadOnlySpan<KvCache> caches, Span<float> logits)
    {
        int chunk = _c.ChunkTokens;
        for (int s = 0; s < tokens.Length; s += chunk)
        {
            int e = Math.Min(tokens.Length, s + chunk);
            for (int r = 0; r < e - s; r++)
            {
                KvCache cache = caches[s + r];
                cache.Reserve(cache.Length + 1);
                _rowCache[r] = cache;
                _rowPos[r] = cache.Length;
                _rowToken[r] = tokens[s + r];
            }

            fixed (float* pl = logits)
            {
                Forward(e - s, -1, pl + ((long)s * _c.Vocab));
            }

            for (int r = 0; r < e - s; r++)
            {
                caches[s + r].Commit(tokens.Slice(s + r, 1), _rowPos[r]);
            }
        }
    }

    /// <summary>
    /// Prefills <paramref name="prompt"/> (reusing whatever prefix of it <paramref name="cache"/> already holds, for
    /// example blocks imported from the fabric) and then generates up to <paramref name="maxNewTokens"/> tokens.
    /// </summary>
    public int[] Generate(ReadOnlySpan<int> prompt, int maxNewTokens, Sampler sampler, KvCache cache)
    {
        ArgumentNullException.ThrowIfNull(sampler);
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentOutOfRangeException.ThrowIfNegative(maxNewTokens);
        if (prompt.IsEmpty)
        {
            throw new ArgumentException("The prompt is empty.", nameof(prompt));
        }

        int reuse = Math.Min(cache.Length, prompt.Length - 1);
        int common = cache.Tokens[..reuse].CommonPrefixLength(prompt[..reuse]);
        var logits = new float[_c.Vocab];
        Prefill(prompt, cache, common, logits);
        var output = new int[maxNewTokens];
        for (int i = 0; i < maxNewTokens; i++)
        {
            output[i] = sampler.Sample(logits);
            if (i + 1 < maxNewTokens)
            {
                DecodeStep(output[i], cache, logits);
            }
        }

        return output;
    }

    // Runs `rows` rows (_rowToken/_rowPos/_rowCache) through the model, writing their K/V into their caches. Logits go
    // to `logits`: for row `onlyRow` alone when it is >= 0, else for every row in order; none when logits is null.
    private void Forward(int rows, int onlyRow, float* logits)
    {
        ModelConfig c = _c;
        int d = c.DModel;
        fixed (float* x = _x, xn = _xn, o = _o, q = _q, k = _k, v = _v, att = _att, gate = _gate, up = _up, emb = _w.Embedding)
        {
            for (int r = 0; r < rows; r++)
            {
                new ReadOnlySpan<float>(emb + ((long)_rowToken[r] * d), d).CopyTo(new Span<float>(x + ((long)r * d), d));
            }

            float qScale = 1f / MathF.Sqrt(c.HeadDim);
            for (int l = 0; l < c.Layers; l++)
            {
                LayerWeights lw = _w.Layers[l];
                fixed (float* attnNorm = lw.AttnNorm, mlpNorm = lw.MlpNorm, wq = lw.Wq, wk = lw.Wk, wv = lw.Wv, wo = lw.Wo,
                       wg = lw.WGate, wu = lw.WUp, wd = lw.WDown)
                {
                    for (int r = 0; r < rows; r++)
                    {
                        Kernels.RmsNorm(x + ((long)r * d), attnNorm, xn + ((long)r * d), d, c.NormEpsilon);
                    }

                    Kernels.MatMul(xn, rows, d, wq, c.QDim, q, _workers);
                    Kernels.MatMul(xn, rows, d, wk, c.KvDim, k, _workers);
                    Kernels.MatMul(xn, rows, d, wv, c.KvDim, v, _workers);
                    for (int r = 0; r < rows; r++)
                    {
                        int pos = _rowPos[r];
                        float* qr = q + ((long)r * c.QDim);
                        float* kr = k + ((long)r * c.KvDim);
                        for (int h = 0; h < c.Heads; h++)
                        {
                            Rope(qr + (h * c.HeadDim), pos);
                        }

                        Kernels.Scale(qr, qScale, c.QDim);
                        for (int h = 0; h < c.KvHeads; h++)
                        {
                            Rope(kr + (h * c.HeadDim), pos);
                        }

                        KvCache cache = _rowCache[r]!;
                        int block = pos / c.TokensPerBlock;
                        long at = (long)(pos % c.TokensPerBlock) * cache.TokenStride;
                        new ReadOnlySpan<float>(kr, c.KvDim).CopyTo(new Span<float>(cache.Slab(block, l, 0) + at, c.KvDim));
                        new ReadOnlySpan<float>(v + ((long)r * c.KvDim), c.KvDim).CopyTo(new Span<float>(cache.Slab(block, l, 1) + at, c.KvDim));
                    }

                    Attention(l, rows, q, att);
                    Kernels.MatMul(att, rows, c.QDim, wo, d, o, _workers);
                    Kernels.AddInPlace(x, o, rows * d);

                    for (int r = 0; r < rows; r++)
                    {
                        Kernels.RmsNorm(x + ((long)r * d), mlpNorm, xn + ((long)r * d), d, c.NormEpsilon);
                    }

                    Kernels.MatMul(xn, rows, d, wg, c.Ffn, gate, _workers);
                    Kernels.MatMul(xn, rows, d, wu, c.Ffn, up, _workers);
                    Kernels.SwiGlu(gate, up, rows * c.Ffn);
                    Kernels.MatMul(gate, rows, c.Ffn, wd, d, o, _workers);
                    Kernels.AddInPlace(x, o, rows * d);
                }
            }

            if (logits == null)
            {
                return;
            }

            int first = onlyRow >= 0 ? onlyRow : 0;
            int count = onlyRow >= 0 ? 1 : rows;
            fixed (float* finalNorm = _w.FinalNorm, head = _w.LmHead ?? _w.Embedding)
            {
                for (int r = 0; r < count; r++)
                {
                    Kernels.RmsNorm(x + ((long)(first + r) * d), finalNorm, xn + ((long)r * d), d, c.NormEpsilon);
                }

                Kernels.MatMul(xn, count, d, head, c.Vocab, logits, _workers);
                if (_w.LmHead is null)
                {
                    Kernels.Scale(logits, 1f / MathF.Sqrt(d), count * c.Vocab);
                }
            }
        }
    }

    // Rotary embedding, rotating pairs (i, i + HeadDim/2) by position * theta^(-2i/HeadDim).
    [MethodImpl(MethodImplOptions.AggressiveInlining)]
    private void Rope(float* x, int pos)
    {
        int half = _half;
        fixed (float* cp = &_cos[pos * half], sp = &_sin[pos * half])
        {
            for (int i = 0; i < half; i++)
            {
                float a = x[i], b = x[i + half], co = cp[i], si = sp[i];
                x[i] = (a * co) - (b * si);
                x[i + half] = (a * si) + (b * co);
            }
        }
    }

    // Causal attention for every (row, KV head): the row at position p attends to keys 0..p of its own cache, scored,
    // normalised and summed in key order with fixed kernels, so the result depends only on p and the cache contents.
    private void Attention(int layer, int rows, float* q, float* att)
    {
        int items = rows * _c.KvHeads;
        int workers = Math.Min(_workers, items);
        long work = 0;
        for (int r = 0; r < rows && work < (1L << 16); r++)
        {
            work += _rowPos[r] + 1L;
        }

        if (workers <= 1 || rows < 2 || work * _c.Heads * _c.HeadDim < (1L << 16))
        {
            fixed (float* scores = _scores)
            {
                for (int it = 0; it < items; it++)
                {
                    Attend(layer, it / _c.KvHeads, it % _c.KvHeads, q, att, scores);
                }
            }

            return;
        }

        AttentionParallel(layer, items, workers, (nint)q, (nint)att);
    }

    private void AttentionParallel(int layer, int items, int workers, nint qp, nint ap)
    {
        Parallel.For(0, workers, w =>
        {
            fixed (float* scores = &_scores[(long)w * _c.GroupSize * _c.MaxPositions])
            {
                // Interleaved items balance the causal triangle; which worker runs an item never changes its result.
                for (int it = w; it < items; it += workers)
                {
                    Attend(layer, it / _c.KvHeads, it % _c.KvHeads, (float*)qp, (float*)ap, scores);
                }
            }
        });
    }

    private void Attend(int layer, int row, int g, float* q, float* att, float* scores)
    {
        ModelConfig c = _c;
        int hd = c.HeadDim, group = c.GroupSize, maxPos = c.MaxPositions, tpb = c.TokensPerBlock;
        KvCache cache = _rowCache[row]!;
        int n = _rowPos[row] + 1;
        int stride = cache.TokenStride;
        float* q0 = q + ((long)row * c.QDim) + ((long)g * group * hd);
        float* out0 = att + ((long)row * c.QDim) + ((long)g * group * hd);
        float** keys = stackalloc float*[AttentionKernels.KeyTile];

        // Scores, 8 keys at a time (the tiling is by absolute key position, so it is the same for every query).
        for (int b = 0, i = 0, filled = 0; i < n; b++)
        {
            float* ks = cache.Slab(b, layer, 0) + ((long)g * hd);
            int count = Math.Min(tpb, n - i);
            for (int t = 0; t < count; t++, i++)
            {
                keys[filled++] = ks + ((long)t * stride);
                if (filled == AttentionKernels.KeyTile || i == n - 1)
                {
                    int first = i + 1 - filled;
                    for (int h = 0; h < group; h++)
                    {
                        AttentionKernels.Scores(q0 + (h * hd), keys, filled, hd, scores + ((long)h * maxPos) + first);
                    }

                    filled = 0;
                }
            }
        }

        for (int h = 0; h < group; h++)
        {
            float* s = scores + ((long)h * maxPos);
            Kernels.ExpShifted(s, AttentionKernels.Max(s, n), n);
        }

        for (int h = 0; h < group; h++)
        {
            AttentionKernels.WeightedSum(cache, layer, g, scores + ((long)h * maxPos), n, out0 + (h * hd), hd, tpb);
            Kernels.Scale(out0 + (h * hd), 1f / Kernels.Sum(scores + ((long)h * maxPos), n), hd);
        }
    }

    private void CheckCache(KvCache cache)
    {
        if (!cache.Layout.Equals(Layout))
        {
            throw new ArgumentException($"The cache's layout ({cache.Layout.Describe()}) is not this model's ({Layout.Describe()}).", nameof(cache));
        }
    }

    private void CheckTokens(ReadOnlySpan<int> tokens)
    {
        for (int i = 0; i < tokens.Length; i++)
        {
            if ((uint)tokens[i] >= (uint)_c.Vocab)
            {
                throw new ArgumentOutOfRangeException(nameof(tokens), tokens[i], $"tokens[{i}] is not in 0 to {_c.Vocab - 1}.");
            }
        }
    }

    private void CheckLogits(Span<float> logits, int rows)
    {
        if (logits.Length < (long)rows * _c.Vocab)
        {
            throw new ArgumentException($"logits needs room for {rows} x {_c.Vocab} floats; it has {logits.Length}.", nameof(logits));
        }
    }

    private static float[] Pinned(int count) => GC.AllocateArray<float>(count, pinned: true);
}
