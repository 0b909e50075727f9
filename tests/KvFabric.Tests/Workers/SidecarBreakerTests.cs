using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Workers.Model;
using KvFabric.Workers.Prefill;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>The prefill's circuit breaker in front of a sidecar that is down (nothing listens on its port).</summary>
public sealed class SidecarBreakerTests
{
    private sealed class ManualTime : TimeProvider
    {
        public long Now = 1;
        public override long TimestampFrequency => TimeSpan.TicksPerSecond;
        public override long GetTimestamp() => Now;
        public void Advance(TimeSpan by) => Now += by.Ticks;
    }

    [Fact]
    public async Task A_sidecar_that_is_down_is_skipped_for_a_cool_down_then_probed_again_with_a_longer_one()
    {
        var time = new ManualTime();
        var breaker = new SidecarBreaker(time) { InitialCooldown = TimeSpan.FromSeconds(1), MaxCooldown = TimeSpan.FromSeconds(3) };
        var model = new Transformer(ModelConfig.Tiny, threads: 1);
        using var pool = model.CreatePool(32);
        using FabricClient dead = FabricClient.Connect("http://127.0.0.1:1", "dev", "dev");
        var prefill = new PrefillEngine(model, dead, "dev", breaker);
        int[] prompt = [.. Enumerable.Range(5, 3 * ModelConfig.Tiny.TokensPerBlock + 2)];
        var logits = new float[ModelConfig.Tiny.Vocab];

        async Task<PrefillOutcome> Run()
        {
            using KvCache cache = model.CreateCache(pool);
            return await prefill.PrefillAsync(prompt, cache, logits);
        }

        // The first prefill calls the sidecar, fails as unavailable, computes the prompt, and opens the breaker.
        PrefillOutcome first = await Run();
        Assert.StartsWith("Fetch: Unavailable", first.FabricError, StringComparison.Ordinal);
        Assert.Equal(prompt.Length, first.ComputedTokens);
        Assert.Equal(TimeSpan.FromSeconds(1), breaker.Cooldown);
        long skippedBefore = breaker.Skipped; // its offload, right after, was skipped already

        // Within the cool-down neither Fetch nor the offload is attempted; the request is still served.
        PrefillOutcome second = await Run();
        Assert.Contains("circuit open", second.FabricError, StringComparison.Ordinal);
        Assert.Equal(prompt.Length, second.ComputedTokens);
        Assert.Equal(skippedBefore + 2, breaker.Skipped);

        // After it, one call probes; the sidecar is still down, so the cool-down doubles, and is capped.
        time.Advance(TimeSpan.FromSeconds(1));
        PrefillOutcome third = await Run();
        Assert.StartsWith("Fetch: Unavailable", third.FabricError, StringComparison.Ordinal);
        Assert.Equal(TimeSpan.FromSeconds(2), breaker.Cooldown);
        time.Advance(TimeSpan.FromSeconds(2));
        await Run();
        Assert.Equal(TimeSpan.FromSeconds(3), breaker.Cooldown);

        // A success closes it.
        breaker.Succeeded();
        Assert.Equal(TimeSpan.Zero, breaker.Cooldown);
        Assert.True(breaker.Allow(out string? why));
        Assert.Null(why);
        // Failures that cost no wait do not open it.
        breaker.Failed(StatusCode.ResourceExhausted, "staging full");
        Assert.True(breaker.Allow(out _));
    }

    [Fact]
    public void Calls_in_flight_when_the_sidecar_went_away_open_the_breaker_once_instead_of_each_doubling_it()
    {
        var time = new ManualTime();
        var breaker = new SidecarBreaker(time) { InitialCooldown = TimeSpan.FromSeconds(1), MaxCooldown = TimeSpan.FromSeconds(8) };
        // Four offloads were waiting on the sidecar when it died: they all fail within the first cool-down.
        for (int i = 0; i < 4; i++)
        {
            breaker.Failed(StatusCode.Unavailable, $"call {i}");
            time.Advance(TimeSpan.FromMilliseconds(100));
        }
        Assert.Equal(TimeSpan.FromSeconds(1), breaker.Cooldown);
        time.Advance(TimeSpan.FromMilliseconds(600)); // 1 s after it opened: probed again
        Assert.True(breaker.Allow(out _));
        breaker.Failed(StatusCode.Unavailable, "probe");
        Assert.Equal(TimeSpan.FromSeconds(2), breaker.Cooldown);
    }

    [Fact]
    public void After_the_cool_down_one_call_probes_while_the_others_keep_skipping()
    {
        var time = new ManualTime();
        var breaker = new SidecarBreaker(time) { InitialCooldown = TimeSpan.FromSeconds(1), MaxCooldown = TimeSpan.FromSeconds(8) };
        breaker.Failed(StatusCode.DeadlineExceeded, "stalled");
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.True(breaker.Allow(out _));                        // the probe (it may wait out a deadline) ...
        Assert.False(breaker.Allow(out string? why));             // ... and the requests meanwhile do not
        Assert.Contains("circuit open", why, StringComparison.Ordinal);
        breaker.Succeeded();
        Assert.True(breaker.Allow(out _));
        Assert.True(breaker.Allow(out _));

        // A probe that never reports (cancelled, or a failure that does not open it) lets another through a cool-down later.
        breaker.Failed(StatusCode.Unavailable, "down");
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.True(breaker.Allow(out _));
        breaker.Failed(StatusCode.Internal, "not a reason to wait");
        Assert.False(breaker.Allow(out _));
        time.Advance(TimeSpan.FromSeconds(1));
        Assert.True(breaker.Allow(out _));
    }
}
