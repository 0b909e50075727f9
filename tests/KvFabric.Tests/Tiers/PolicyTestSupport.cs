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
    public static string ConversationTrace()
    {
        string? root = Environment.GetEnvironmentVariable("KVFABRIC_SHARED");
        if (root is null)
        {
            for (var dir = new DirectoryInfo(AppContext.BaseDirectory); dir is not null; dir = dir.Parent)
            {
                string candidate = Path.Combine(dir.FullName, "shared");
                if (File.Exists(Path.Combine(candidate, "traces", "conversation_trace.jsonl")))
                {
                    root = candidate;
                    break;
                }
            }
        }
        string path = Path.Combine(root ?? "shared", "traces", "conversation_trace.jsonl");
        if (!File.Exists(path))
            throw new FileNotFoundException($"The conversation trace is not at {path}: put shared/ beside the repository or set KVFABRIC_SHARED.", path);
        return path;
    }
}
