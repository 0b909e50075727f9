using KvFabric.Rpc;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;

namespace KvFabric.Routing;

/// <summary>How a request is sent to one of the workers.</summary>
public enum RoutePolicy
{
    /// <summary>RouteCost.Choose at temperature 0 over every worker's matched prefix (split by tier) and its load.</summary>
    KvAware,

    /// <summary>The same cost with the load term left at zero: pure prefix overlap (hot-spots).</summary>
    KvOverlap,

    /// <summary>Request i goes to worker i mod W.</summary>
    RoundRobin,

    /// <summary>A uniformly drawn worker, from a seeded generator.</summary>
    Random,
}

/// <summary>The simulated cluster: W workers, each with its own fixed-capacity tier hierarchy, and the load model.</summary>
public sealed record RoutedReplayOptions
{
    public int Workers { get; init; } = 4;

    /// <summary>Each worker's tiers, fastest first (one entry per tier of CapacityBlocks).</summary>
    public IReadOnlyList<TierKind> Tiers { get; init; } = [TierKind.Host];

    /// <summary>Blocks per tier, per worker.</summary>
    public IReadOnlyList<int> CapacityBlocks { get; init; } = [4000];

    /// <summary>Eviction policy of every tier (PolicyFactory spec).</summary>
    public string EvictionPolicy { get; init; } = "lru";

    /// <summary>Prefill throughput of one worker: a request occupies it for (input tokens not hit) / this.</summary>
    public double PrefillTokensPerSecond { get; init; } = 16_000;

    /// <summary>Added occupancy per output token (0: prefill workers of a disaggregated deployment; decode runs elsewhere).</summary>
    public double DecodeMsPerToken { get; init; }

    /// <summary>Seed of the random policy.</summary>
    public ulong Seed { get; init; } = 42;

    public int MaxRequests { get; init; } = int.MaxValue;
}

/// <summary>What one routing policy achieved over a trace.</summary>
public sealed class RoutedReplayResult
{
    internal RoutedReplayResult(string name, int workers, IReadOnlyList<TierKind> tiers)
    {
        Name = name;
        Tiers = tiers;
        RequestsPerWorker = new int[workers];
        BusyMsPerWorker = new double[workers];
        HitTokensByTier = new long[tiers.Count];
    }

    public string Name { get; }
    public IReadOnlyList<TierKind> Tiers { get; }
    public int Requests { get; internal set; }
    public long InputTokens { get; internal set; }

    /// <summary>Tokens of matched full blocks (matched blocks × tokens per block; partial blocks are never shared).</summary>
    public long HitTokens { get; internal set; }

    public long FullBlocks { get; internal set; }
    public long HitBlocks { get; internal set; }
    public long[] HitTokensByTier { get; }
    public int[] RequestsPerWorker { get; }

    /// <summary>Simulated time each worker spent serving (prefill of the tokens not hit, plus decode if modelled).</summary>
    public double[] BusyMsPerWorker { get; }

    /// <summary>Sum over requests of the matched blocks the router saw on the worker it chose, at routing time.</summary>
    public long ExpectedHitBlocks { get; internal set; }

    /// <summary>Sum over requests of the blocks the chosen worker then really read from its cache.</summary>
    public long ActualHitBlocks { get; internal set; }

    /// <summary>Requests whose expected and actual hit differ (0 in this simulation: events apply at once).</summary>
    public int ExpectedActualMismatches { get; internal set; }

    /// <summary>Simulated time to first token of each request: queueing behind its worker's earlier work, then its prefill.</summary>
    public double[] TtftMs { get; internal set; } = [];

    public double Seconds { get; internal set; }

    public double TokenHitRate => InputTokens == 0 ? 0 : (double)HitTokens / InputTokens;
    public double BlockHitRate => FullBlocks == 0 ? 0 : (double)HitBlocks / FullBlocks;

    /// <summary>Load imbalance: the busiest worker's request count over the mean.</summary>
    public double MaxOverMeanRequests => Imbalance(RequestsPerWorker.Select(r => (double)r));

    public double MaxOverMeanBusy => Imbalance(BusyMsPerWorker);

    public double MeanTtftMs => TtftMs.Length == 0 ? 0 : TtftMs.Average();

    public double TtftPercentileMs(double p)
    {
        if (TtftMs.Length == 0)
            return 0;
        double[] sorted = [.. TtftMs];
        Array.Sort(sorted);
        int rank = (int)Math.Ceiling(p / 100 * sorted.Length) - 1;
        return sorted[Math.Clamp(rank, 0, sorted.Length - 1)];
    }

    private static double Imbalance(IEnumerable<double> values)
    {
        double[] v = [.. values];
        double mean = v.Length == 0 ? 0 : v.Average();
        return mean == 0 ? 0 : v.Max() / mean;
    }
}

/// <summary>
/// Replays a trace over W simulated workers, each with its own cache (a real TierManager over key-only stores, so
/// eviction is the real leaf-first policy), sending each request where a routing policy says.
///
/// Model (deterministic, driven by the trace's timestamps): requests arrive in trace order at their timestamp. The
/// router sees every worker's matched prefix of the request's full-block chain, split by tier: what the global index's
/// Match answers when KV events are applied at once, which is each worker's own lookup. A worker serves its requests
/// first come, first served; a request occupies it for (input tokens - hit tokens) / PrefillTokensPerSecond plus
/// output tokens × DecodeMsPerToken. The load the router sees is the worker's outstanding work at the arrival time,
/// max(0, busy-until - now), expressed in blocks of prefill (× PrefillTokensPerSecond / tokens per block), the unit of
/// RouteCost's other terms, so the cost reads as the request's time to first token in blocks. The chosen worker then
/// looks up the chain itself (the actual hit), reads the hit prefix and stores the request's full blocks at once (the
/// cache's state at the next arrival includes them).
/// </summary>
public static class RoutedReplay
{
    private const int BlockBytes = 4096; // key-only stores: only the capacity in blocks matters

    public static string NameOf(RoutePolicy policy) => policy switch
    {
        RoutePolicy.KvAware => "kv-aware",
        RoutePolicy.KvOverlap => "kv-overlap",
        RoutePolicy.RoundRobin => "round-robin",
        RoutePolicy.Random => "random",
        _ => throw new ArgumentOutOfRangeException(nameof(policy), policy, null),
    };

    public static string WorkerName(int worker) => $"w{worker:D4}";

    public static RoutedReplayResult Run(ReplayTrace trace, RoutedReplayOptions options, RoutePolicy policy, string? name = null)
    {
        ArgumentNullException.ThrowIfNull(trace);
        ArgumentNullException.ThrowIfNull(options);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.Workers, 1);
        if (options.Tiers.Count == 0 || options.Tiers.Count != options.CapacityBlocks.Count)
            throw new ArgumentException($"{options.Tiers.Count} tiers but {options.CapacityBlocks.Count} capacities; give one capacity per tier", nameof(options));
        if (!double.IsFinite(options.PrefillTokensPerSecond) || options.PrefillTokensPerSecond <= 0)
            throw new ArgumentException($"prefill throughput must be positive; got {options.PrefillTokensPerSecond}", nameof(options));
        if (!double.IsFinite(options.DecodeMsPerToken) || options.DecodeMsPerToken < 0)
            throw new ArgumentException($"decode time per token must be >= 0; got {options.DecodeMsPerToken}", nameof(options));

        int w = options.Workers;
        var caches = new TierManagerReplayCache[w];
        try
        {
            for (int i = 0; i < w; i++)
            {
                var tiers = new SimulatedTier[options.Tiers.Count];
                for (int t = 0; t < tiers.Length; t++)
                {
                    int capacity = options.CapacityBlocks[t];
                    tiers[t] = new SimulatedTier(options.Tiers[t], capacity, PolicyFactory.Create(options.EvictionPolicy, capacity, trace.TokensPerBlock,
                        middleTier: t > 0 && t < tiers.Length - 1));
                }
                caches[i] = new TierManagerReplayCache(tiers, BlockBytes, WorkerName(i));
            }

            return Replay(trace, options, policy, name ?? NameOf(policy), caches);
        }
        finally
        {
            foreach (var c in caches)
                c?.Dispose();
        }
    }

    private static RoutedReplayResult Replay(ReplayTrace trace, RoutedReplayOptions o, RoutePolicy policy, string name, TierManagerReplayCache[] caches)
    {
        var started = System.Diagnostics.Stopwatch.GetTimestamp();
        int w = caches.Length;
        int requests = Math.Min(o.MaxRequests, trace.Count);
        var result = new RoutedReplayResult(name, w, o.Tiers);
        var ttft = new double[requests];
        var kinds = new TierKind[Math.Max(1, trace.MaxChainLength)];
        var candidates = new RouteCandidateInfo[w];
        var matchedOf = new int[w];
        var busyUntilMs = new double[w];
        var random = new Random(unchecked((int)o.Seed ^ (int)(o.Seed >> 32)));
        double msPerToken = 1000.0 / o.PrefillTokensPerSecond;
        double blocksPerMs = o.PrefillTokensPerSecond / 1000.0 / trace.TokensPerBlock;

        for (int r = 0; r < requests; r++)
        {
            TraceRequest request = trace[r];
            double now = request.TimestampMs;
            ReadOnlySpan<BlockKey> chain = trace.Chain(r)[..trace.FullBlocks(r)];
            int chosen;
            int expected;
            switch (policy)
            {
                case RoutePolicy.KvAware:
                case RoutePolicy.KvOverlap:
                    for (int i = 0; i < w; i++)
                    {
                        int matched = caches[i].LookupPrefix(chain, kinds);
                        matchedOf[i] = matched;
                        int gpu = 0, host = 0, ssd = 0;
                        for (int b = 0; b < matched; b++)
                        {
                            switch (kinds[b])
                            {
                                case TierKind.Gpu: gpu++; break;
                                case TierKind.Host: host++; break;
                                default: ssd++; break;
                            }
                        }

                        double load = policy == RoutePolicy.KvAware ? Math.Max(0, busyUntilMs[i] - now) * blocksPerMs : 0;
                        candidates[i] = new RouteCandidateInfo(WorkerName(i), "prefill", gpu, host, ssd, load);
                    }

                    chosen = RouteCost.Choose(candidates, chain.Length, temperature: 0, seed: 0);
                    expected = matchedOf[chosen];
                    break;
                case RoutePolicy.RoundRobin:
                    chosen = r % w;
                    expected = caches[chosen].LookupPrefix(chain, kinds);
                    break;
                case RoutePolicy.Random:
                    chosen = random.Next(w);
                    expected = caches[chosen].LookupPrefix(chain, kinds);
                    break;
                default:
                    throw new ArgumentOutOfRangeException(nameof(policy), policy, null);
            }

            // The chosen worker's own lookup when it takes the request: the hit it really gets.
            int actual = caches[chosen].LookupPrefix(chain, kinds);
            long hitTokens = (long)actual * trace.TokensPerBlock;
            result.Requests++;
            result.InputTokens += request.InputLength;
            result.HitTokens += hitTokens;
            result.FullBlocks += chain.Length;
            result.HitBlocks += actual;
            for (int b = 0; b < actual; b++)
                result.HitTokensByTier[IndexOf(o.Tiers, kinds[b])] += trace.TokensPerBlock;
            result.ExpectedHitBlocks += expected;
            result.ActualHitBlocks += actual;
            if (expected != actual)
                result.ExpectedActualMismatches++;
            result.RequestsPerWorker[chosen]++;

            double start = Math.Max(now, busyUntilMs[chosen]);
            double prefillMs = (request.InputLength - hitTokens) * msPerToken;
            double serviceMs = prefillMs + request.OutputLength * o.DecodeMsPerToken;
            busyUntilMs[chosen] = start + serviceMs;
            result.BusyMsPerWorker[chosen] += serviceMs;
            ttft[r] = start - now + prefillMs;

            caches[chosen].Put(chain);
        }

        result.TtftMs = ttft;
        result.Seconds = System.Diagnostics.Stopwatch.GetElapsedTime(started).TotalSeconds;
        return result;
    }

    private static int IndexOf(IReadOnlyList<TierKind> tiers, TierKind kind)
    {
        for (int i = 0; i < tiers.Count; i++)
        {
            if (tiers[i] == kind)
                return i;
        }
        throw new ArgumentException($"no {kind} tier", nameof(kind));
    }
}
