using KvFabric.Tiers.Replay;
using KvFabric.Workers.Driver;
using Xunit;

namespace KvFabric.Tests.Workers;

public sealed class WorkloadTests
{
    private static readonly string Slice = Path.Combine(AppContext.BaseDirectory, "Tiers", "data", "conversation_trace_first1500.jsonl");

    private static int CommonPrefix(int[] a, int[] b)
    {
        int n = 0;
        while (n < a.Length && n < b.Length && a[n] == b[n])
            n++;
        return n;
    }

    [Fact]
    public void Trace_requests_share_token_prefixes_exactly_where_they_share_hash_ids()
    {
        var trace = new ReplayTrace(512,
        [
            (1000, 1024, 100, [7, 8]),
            (1500, 1300, 600, [7, 8, 9]),   // shares blocks 7, 8; its last block holds 276 of 512 tokens
            (2000, 512, 1, [5]),
        ]);
        var scale = new WorkloadScale(TokensPerTraceBlock: 16, MaxNewTokens: 8, TimeScale: 0.5);
        var requests = Workloads.FromTrace(trace, scale, vocab: 1000);
        Assert.Equal([32, 32 + 9, 16], requests.Select(r => r.Prompt.Length)); // 276/512 x 16 = 8.6: 9 tokens
        Assert.Equal(32, CommonPrefix(requests[0].Prompt, requests[1].Prompt));
        Assert.Equal(0, CommonPrefix(requests[0].Prompt, requests[2].Prompt));
        Assert.Equal([0L, 250L, 500L], requests.Select(r => r.ArrivalMs));
        Assert.Equal([4, 8, 1], requests.Select(r => r.MaxNewTokens)); // 100/32 -> 4; 600/32 capped at 8; at least 1
        Assert.All(requests.SelectMany(r => r.Prompt), t => Assert.InRange(t, 1, 999));
        // A pure function of the trace: the same input gives the same tokens.
        Assert.Equal(requests[1].Prompt, Workloads.FromTrace(trace, scale, 1000)[1].Prompt);
    }

    [Fact]
    public void The_real_trace_slice_scales_to_cpu_sized_prompts_with_its_reuse_intact()
    {
        var trace = ReplayTrace.Load(Slice, 512, maxRequests: 300);
        var requests = Workloads.FromTrace(trace, new WorkloadScale(MaxPromptTokens: 1024), vocab: 4096);
        Assert.Equal(300, requests.Count);
        Assert.All(requests, r => Assert.InRange(r.Prompt.Length, 1, 1024));
        Assert.True(requests.Zip(requests.Skip(1)).All(p => p.First.ArrivalMs <= p.Second.ArrivalMs));
        // Requests whose first hash id is the same start with the same 16 tokens.
        for (int i = 1; i < requests.Count; i++)
        {
            bool sameFirst = trace.Chain(i)[0].Hash == trace.Chain(i - 1)[0].Hash;
            Assert.Equal(sameFirst, requests[i].Prompt.AsSpan(0, 16).SequenceEqual(requests[i - 1].Prompt.AsSpan(0, 16)));
        }
    }

    [Fact]
    public void Shared_prefix_chats_share_the_system_prompt_and_grow_their_own_history()
    {
        var chats = Workloads.SharedPrefixChats(requests: 40, promptTokens: 200, sharedFraction: 0.9, conversations: 4,
            maxNewTokens: 5, vocab: 512, ratePerSecond: 10, seed: 3);
        Assert.Equal(40, chats.Count);
        Assert.All(chats, r => Assert.InRange(r.Prompt.Length, 181, 200));
        Assert.All(chats, r => Assert.True(CommonPrefix(r.Prompt, chats[0].Prompt) >= 180));
        Assert.True(chats.Zip(chats.Skip(1)).All(p => p.First.ArrivalMs <= p.Second.ArrivalMs));
        var again = Workloads.SharedPrefixChats(40, 200, 0.9, 4, 5, 512, 10, seed: 3);
        Assert.Equal(chats.Select(r => r.Prompt), again.Select(r => r.Prompt));
        Assert.NotEqual(chats[0].Prompt, Workloads.SharedPrefixChats(40, 200, 0.9, 4, 5, 512, 10, seed: 4)[0].Prompt);
        Assert.Throws<ArgumentException>(() => Workloads.SharedPrefixChats(1, 200, 1.0, 1, 1, 512, 1, 0));
    }
}
