using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Replay;

namespace KvFabric.Tests.Tiers;

internal static class PolicyTestSupport
{
    public const int BlockBytes = 1 << 20;

    public static BlockKey Key(ulong id) => new(0, new BlockHash(0, id));

    public static PolicyBlockInfo Info(ulong id, int depth = 0) => new(Key(id), depth, BlockBytes);

    // Admits handle h as block `id` and makes it evictable (a leaf, not pinned).
    public static void AdmitLeaf(this IEvictionPolicy policy, int h, ulong id, int depth = 0)
    {
        policy.OnAdmit(h, Info(id, depth));
        policy.SetEvictable(h, true);
    }

    public static int Victim(this IEvictionPolicy policy)
    {
        Xunit.Assert.True(policy.TryPickVictim(out int h), "expected a victim");
        return h;
    }

    // A trace built from chains of small ids; input_length = full blocks × T, minus `partialShort` tokens of the last.
    public static ReplayTrace Trace(int tokensPerBlock, params long[][] chains) =>
        new(tokensPerBlock, [.. chains.Select((c, i) => (TimestampMs: (long)i, InputLength: c.Length * tokensPerBlock, OutputLength: 1, HashIds: c))]);

    // The real trace of the FAST'25 Mooncake release, from shared/ beside the repository (or KVFABRIC_SHARED).
    // The first 1,500 requests of Mooncake's conversation trace, kept with the tests (Tiers/data/README.md).
    public static string ConversationTrace()
    {
        string path = Path.Combine(AppContext.BaseDirectory, "Tiers", "data", "conversation_trace_first1500.jsonl");
        if (!File.Exists(path))
            throw new FileNotFoundException($"The trace slice is not at {path}: it is copied next to the tests by the test project; rebuild.", path);
        return path;
    }
}
