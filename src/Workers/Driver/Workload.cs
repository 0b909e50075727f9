using KvFabric.Tiers.Replay;

namespace KvFabric.Workers.Driver;

/// <summary>One request of a workload: when it arrives (ms from the start), its prompt's token ids, how many tokens to generate.</summary>
public sealed record WorkloadRequest(int Id, long ArrivalMs, int[] Prompt, int MaxNewTokens);

/// <summary>
/// How a production trace is scaled to what a CPU model can run: each trace block (512 tokens in Mooncake's traces)
/// becomes TokensPerTraceBlock tokens (a partial last block proportionally fewer, at least one), prompts are cut at
/// MaxPromptTokens (at a block boundary), outputs scaled the same way and capped, and arrival times multiplied by TimeScale.
/// </summary>
public sealed record WorkloadScale(int TokensPerTraceBlock = 16, int MaxPromptTokens = 2048, int MaxNewTokens = 32, double TimeScale = 1.0)
{
    public WorkloadScale Validate()
    {
        if (TokensPerTraceBlock < 1 || MaxPromptTokens < TokensPerTraceBlock || MaxNewTokens < 1 || !(TimeScale >= 0) || !double.IsFinite(TimeScale))
            throw new ArgumentException($"invalid workload scale {this}: tokens per trace block >= 1, max prompt tokens >= that, max new tokens >= 1, a finite time scale >= 0");
        return this;
    }
}

/// <summary>
/// Workloads for the workers: Mooncake-format traces turned into token ids, and synthetic multi-turn chats. Token
/// blocks are a pure function of what identifies them (a trace's hash id, a chat's shared system prompt and turn), so
/// requests that share ids share token prefixes, and so KV blocks, exactly as in the trace.
/// </summary>
public static class Workloads
{
    /// <summary>The tokens of one trace block: a pure function of its hash id (token 0 is left out: it is reserved).</summary>
    public static void TokensOfBlock(long hashId, Span<int> tokens, int vocab)
    {
        if (vocab < 2)
            throw new ArgumentOutOfRangeException(nameof(vocab), vocab, "the vocabulary needs at least 2 tokens");
        for (int j = 0; j < tokens.Length; j++)
            tokens[j] = 1 + (int)(Mix((ulong)hashId * 0x100000001B3UL + (ulong)j + 1) % (ulong)(vocab - 1));
    }

    public static IReadOnlyList<WorkloadRequest> FromTrace(ReplayTrace trace, WorkloadScale scale, int vocab, int maxRequests = int.MaxValue)
    {
        ArgumentNullException.ThrowIfNull(trace);
        scale.Validate();
        int n = Math.Min(trace.Count, maxRequests);
        var requests = new List<WorkloadRequest>(n);
        long start = n > 0 ? trace[0].TimestampMs : 0;
        var prompt = new List<int>(scale.MaxPromptTokens);
        var block = new int[scale.TokensPerTraceBlock];
        for (int i = 0; i < n; i++)
        {
            TraceRequest r = trace[i];
            ReadOnlySpan<Tiers.BlockKey> chain = trace.Chain(i);
            prompt.Clear();
            for (int b = 0; b < chain.Length; b++)
            {
                int traceTokens = trace.TokensOfBlock(r.InputLength, b);
                int tokens = traceTokens == trace.TokensPerBlock
                    ? scale.TokensPerTraceBlock
                    : Math.Max(1, (int)Math.Ceiling((double)traceTokens * scale.TokensPerTraceBlock / trace.TokensPerBlock));
                if (prompt.Count + tokens > scale.MaxPromptTokens)
                    break;
                TokensOfBlock((long)chain[b].Hash.Lo, block.AsSpan(0, tokens), vocab);
                for (int t = 0; t < tokens; t++)
                    prompt.Add(block[t]);
            }

            int output = Math.Clamp((int)Math.Ceiling((double)r.OutputLength * scale.TokensPerTraceBlock / trace.TokensPerBlock), 1, scale.MaxNewTokens);
            requests.Add(new WorkloadRequest(i, (long)((r.TimestampMs - start) * scale.TimeScale), prompt.ToArray(), output));
        }

        return requests;
    }

    /// <summary>
    /// Multi-turn chats over one shared system prompt: each request's prompt is the shared prefix (sharedFraction of
    /// promptTokens), then its conversation's earlier turns, then a new turn; arrivals are a Poisson process at rate per
    /// second. Deterministic for a seed.
    /// </summary>
    public static IReadOnlyList<WorkloadRequest> SharedPrefixChats(int requests, int promptTokens, double sharedFraction, int conversations,
        int maxNewTokens, int vocab, double ratePerSecond, ulong seed)
    {
        if (requests < 1 || promptTokens < 2 || conversations < 1 || maxNewTokens < 1 || !(sharedFraction is >= 0 and < 1) || !(ratePerSecond > 0))
            throw new ArgumentException("requests, conversations, max new tokens >= 1; prompt tokens >= 2; shared fraction in [0, 1); rate > 0");
        int shared = (int)(promptTokens * sharedFraction);
        var systemPrompt = new int[shared];
        TokensOfBlock(-1 - (long)(seed & 0x7FFF_FFFF), systemPrompt, vocab);
        var history = new List<int>[conversations];
        for (int c = 0; c < conversations; c++)
            history[c] = [];
        var rng = new Random(unchecked((int)seed ^ (int)(seed >> 32)));
        var list = new List<WorkloadRequest>(requests);
        double at = 0;
        int turnTokens = Math.Max(1, (promptTokens - shared) / 4);
        for (int i = 0; i < requests; i++)
        {
            at += -Math.Log(1 - rng.NextDouble()) / ratePerSecond * 1000;
            int c = rng.Next(conversations);
            var turn = new int[turnTokens];
            TokensOfBlock(((long)c << 32) | (uint)history[c].Count, turn, vocab);
            // The prompt never outgrows promptTokens: the conversation's oldest turns fall out (a new prefix then).
            while (shared + history[c].Count + turnTokens > promptTokens && history[c].Count > 0)
                history[c].RemoveRange(0, Math.Min(turnTokens, history[c].Count));
            history[c].AddRange(turn);
            list.Add(new WorkloadRequest(i, (long)at, [.. systemPrompt, .. history[c]], maxNewTokens));
        }

        return list;
    }

    private static ulong Mix(ulong x)
    {
        // SplitMix64's finalizer: consecutive inputs give unrelated outputs.
        x += 0x9E3779B97F4A7C15UL;
        x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9UL;
        x = (x ^ (x >> 27)) * 0x94D049BB133111EBUL;
        return x ^ (x >> 31);
    }
}
