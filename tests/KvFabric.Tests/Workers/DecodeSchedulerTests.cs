using System.Threading.Channels;
using KvFabric.Memory;
using KvFabric.Workers.Decode;
using KvFabric.Workers.Model;
using Xunit;

namespace KvFabric.Tests.Workers;

public sealed class DecodeSchedulerTests
{
    private static readonly ModelConfig Config = ModelConfig.Tiny;

    private static int[] Prompt(int seed, int length)
    {
        var rng = new Random(seed);
        return Enumerable.Range(0, length).Select(_ => 1 + rng.Next(Config.Vocab - 1)).ToArray();
    }

    /// <summary>Every sequence's cache went back: the pool is whole again (the scheduler retires at its next step).</summary>
    private static async Task AssertWholeAsync(HostBlockPool pool)
    {
        await WaitUntilAsync(() => pool.Available == pool.Capacity);
        Assert.Equal(pool.Capacity, pool.Available);
    }

    private static async Task WaitUntilAsync(Func<bool> condition)
    {
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(10);
        while (!condition() && DateTime.UtcNow < deadline)
            await Task.Delay(10);
        Assert.True(condition(), "not reached within 10 s");
    }

    private static async Task<int[]> ReadAllAsync(ChannelReader<GeneratedToken> reader)
    {
        var tokens = new List<int>();
        await foreach (GeneratedToken t in reader.ReadAllAsync())
        {
            Assert.Equal(tokens.Count, t.Index);
            tokens.Add(t.Token);
        }

        return [.. tokens];
    }

    [Fact]
    public async Task Batched_sequences_generate_what_each_generates_alone_and_free_their_blocks()
    {
        var model = new Transformer(Config, threads: 1);
        var reference = new Transformer(Config, threads: 1);
        using HostBlockPool pool = model.CreatePool(256);
        using HostBlockPool refPool = reference.CreatePool(64);
        await using var scheduler = new DecodeScheduler(model, maxBatch: 3);
        var prompts = Enumerable.Range(0, 5).Select(i => Prompt(i, 9 + 3 * i)).ToArray();
        int[] lengths = [20, 7, 13, 20, 1];
        var streams = new List<Task<int[]>>();
        foreach (var (prompt, i) in prompts.Select((p, i) => (p, i)))
        {
            KvCache cache = model.CreateCache(pool);
            float[] logits = model.Prefill(prompt, cache);
            streams.Add(ReadAllAsync(await scheduler.StartAsync(cache, logits, lengths[i], Sampler.Greedy())));
        }

        int[][] outputs = await Task.WhenAll(streams).WaitAsync(TimeSpan.FromSeconds(60));
        for (int i = 0; i < prompts.Length; i++)
        {
            using KvCache alone = reference.CreateCache(refPool);
            Assert.Equal(reference.Generate(prompts[i], lengths[i], Sampler.Greedy(), alone), outputs[i]);
        }

        Assert.True(scheduler.Steps < lengths.Sum(), $"{scheduler.Steps} steps for {lengths.Sum()} tokens: nothing was batched");
        Assert.InRange(scheduler.MeanBatch, 1.0, 3.0);
        // Every sequence's cache went back: the pool is whole again.
        await AssertWholeAsync(pool);
    }

    [Fact]
    public async Task A_cancelled_sequence_ends_with_the_cancellation_and_frees_its_blocks()
    {
        var model = new Transformer(Config, threads: 1);
        using HostBlockPool pool = model.CreatePool(64);
        await using var scheduler = new DecodeScheduler(model);
        using var cts = new CancellationTokenSource();
        KvCache cache = model.CreateCache(pool);
        float[] logits = model.Prefill(Prompt(3, 10), cache);
        ChannelReader<GeneratedToken> tokens = await scheduler.StartAsync(cache, logits, 400, Sampler.Greedy(), cts.Token);
        await tokens.ReadAsync(); // it runs
        await cts.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (GeneratedToken _ in tokens.ReadAllAsync())
            {
            }
        });
        await AssertWholeAsync(pool);
    }

    [Fact]
    public async Task A_sequence_cancelled_while_it_waits_for_a_full_batch_ends_and_frees_its_blocks_at_once()
    {
        // Long enough that the one active sequence is still running when the waiting one is cancelled.
        var model = new Transformer(Config with { MaxPositions = 8192, Layers = 8 }, threads: 1);
        using HostBlockPool pool = model.CreatePool(4096);
        using HostBlockPool waitingPool = model.CreatePool(64); // its own pool: the running sequence grows in the other
        await using var scheduler = new DecodeScheduler(model, maxBatch: 1);
        KvCache running = model.CreateCache(pool);
        ChannelReader<GeneratedToken> first = await scheduler.StartAsync(running, model.Prefill(Prompt(5, 10), running), 8000, Sampler.Greedy());
        await first.ReadAsync(); // it holds the batch

        using var cts = new CancellationTokenSource();
        KvCache waiting = model.CreateCache(waitingPool);
        ChannelReader<GeneratedToken> second = await scheduler.StartAsync(waiting, model.Prefill(Prompt(6, 40), waiting), 4, Sampler.Greedy(), cts.Token);
        Assert.True(waitingPool.Available < waitingPool.Capacity);
        await cts.CancelAsync();

        // Ended and given back now, not when the batch has room (thousands of steps later).
        Assert.True(second.Completion.IsCompleted, "the cancelled sequence still waits for the batch");
        await Assert.ThrowsAnyAsync<OperationCanceledException>(() => second.Completion);
        Assert.False(first.Completion.IsCompleted);
        Assert.Equal(waitingPool.Capacity, waitingPool.Available);
    }

    [Fact]
    public async Task After_the_decode_loop_failed_a_new_sequence_is_told_the_worker_decodes_no_more()
    {
        var model = new Transformer(Config, threads: 1);
        using HostBlockPool pool = model.CreatePool(64);
        await using var scheduler = new DecodeScheduler(model);
        // A cache of another model's layout fails the batch step: the loop ends, and every sequence with it.
        var other = new Transformer(Config with { TokensPerBlock = 8 }, threads: 1);
        using HostBlockPool otherPool = other.CreatePool(8);
        KvCache foreign = other.CreateCache(otherPool);
        ChannelReader<GeneratedToken> doomed = await scheduler.StartAsync(foreign, other.Prefill(Prompt(7, 10), foreign), 4, Sampler.Greedy());
        await Assert.ThrowsAnyAsync<InvalidOperationException>(async () => await ReadAllAsync(doomed));

        KvCache cache = model.CreateCache(pool);
        float[] logits = model.Prefill(Prompt(8, 10), cache);
        var e = await Assert.ThrowsAsync<DecodeUnavailableException>(async () => await scheduler.StartAsync(cache, logits, 4, Sampler.Greedy()));
        Assert.Contains("decode loop failed", e.Message, StringComparison.Ordinal);
        Assert.Contains("restart", e.Message, StringComparison.Ordinal);
        cache.Dispose(); // refused: still the caller's
    }

    [Fact]
    public async Task Bad_requests_are_refused_with_the_reason()
    {
        var model = new Transformer(Config, threads: 1);
        using HostBlockPool pool = model.CreatePool(8);
        await using var scheduler = new DecodeScheduler(model);
        using KvCache cache = model.CreateCache(pool);
        await Assert.ThrowsAsync<ArgumentOutOfRangeException>(async () => await scheduler.StartAsync(cache, new float[Config.Vocab], 0, Sampler.Greedy()));
        var e = await Assert.ThrowsAsync<ArgumentException>(async () => await scheduler.StartAsync(cache, new float[3], 5, Sampler.Greedy()));
        Assert.Contains("vocabulary", e.Message, StringComparison.Ordinal);
        // More tokens than the sequence can hold are refused up front instead of failing every batched sequence later.
        var full = await Assert.ThrowsAsync<ArgumentException>(async () => await scheduler.StartAsync(cache, new float[Config.Vocab], Config.MaxPositions + 2, Sampler.Greedy()));
        Assert.Contains("do not fit", full.Message, StringComparison.Ordinal);
        // A sequence whose pool runs dry ends alone with the reason (8 blocks of 4 tokens: 32 positions), and the pool
        // gets every block back.
        KvCache starved = model.CreateCache(pool);
        var starvedStream = await scheduler.StartAsync(starved, model.Prefill(Prompt(2, 5), starved), 100, Sampler.Greedy());
        var dry = await Assert.ThrowsAsync<InvalidOperationException>(async () =>
        {
            await foreach (GeneratedToken _ in starvedStream.ReadAllAsync())
            {
            }
        });
        Assert.Contains("cannot grow", dry.Message, StringComparison.Ordinal);
        await WaitUntilAsync(() => pool.Available == pool.Capacity);
        // One cache cannot be two sequences (a long one, from a pool that holds it, so it is still running).
        using HostBlockPool big = model.CreatePool(128);
        KvCache owned = model.CreateCache(big);
        float[] logits = model.Prefill(Prompt(1, 5), owned);
        using var stop = new CancellationTokenSource();
        var stream = await scheduler.StartAsync(owned, logits, 400, Sampler.Greedy(), stop.Token); // still running below
        await Assert.ThrowsAsync<ArgumentException>(async () => await scheduler.StartAsync(owned, logits, 3, Sampler.Greedy()));
        await stop.CancelAsync();
        await Assert.ThrowsAnyAsync<OperationCanceledException>(async () =>
        {
            await foreach (GeneratedToken _ in stream.ReadAllAsync())
            {
            }
        });
    }
}
