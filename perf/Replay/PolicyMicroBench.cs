using System.Diagnostics;
using KvFabric.Blocks;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;

namespace KvFabric.Bench.Replay;

/// <summary>
/// Policy metadata operations per second on one thread, in the tier manager's pattern: a full tier of evictable
/// blocks; per step, a put that hits a resident block (pinned while the put runs) and adds a new block, which is offered
/// for admission and takes the handle of the victim it displaces. Every interface call counts as one operation.
/// </summary>
public static class PolicyMicroBench
{
    public sealed record Result(string Policy, long Operations, double Seconds)
    {
        public double OpsPerSecond => Operations / Seconds;
    }

    public static Result Measure(string policySpec, int capacity, int steps, int tokensPerBlock)
    {
        var policy = PolicyFactory.Create(policySpec, capacity, tokensPerBlock);
        ulong rng = 0x9E3779B97F4A7C15UL;
        ulong nextKey = 0;
        for (int h = 0; h < capacity; h++)
        {
            policy.OnAdmit(h, Info(nextKey++, h));
            policy.SetEvictable(h, true);
        }
        // One warm-up pass over the same code paths, then the measured pass.
        Run(policy, capacity, steps / 4, ref rng, ref nextKey);
        var sw = Stopwatch.StartNew();
        long ops = Run(policy, capacity, steps, ref rng, ref nextKey);
        sw.Stop();
        return new Result(policy.Name, ops, sw.Elapsed.TotalSeconds);
    }

    private static long Run(IEvictionPolicy policy, int capacity, int steps, ref ulong rng, ref ulong nextKey)
    {
        long ops = 0;
        for (int s = 0; s < steps; s++)
        {
            // A put whose prefix hits block `hit` (pinned while the put runs) and adds a child under it.
            int hit = (int)(Next(ref rng) % (ulong)capacity);
            policy.SetEvictable(hit, false);
            policy.OnAccess(hit);
            var info = Info(nextKey++, (int)(Next(ref rng) % 64));
            ops += 3;
            if (policy.ShouldAdmit(info) && policy.TryPickVictim(out int victim))
            {
                policy.OnRemove(victim);
                policy.OnAdmit(victim, info);
                policy.SetEvictable(victim, true);
                ops += 4;
            }
            else
            {
                ops++;
            }
            // The put ends: the pin is released.
            policy.SetEvictable(hit, true);
            ops++;
        }
        return ops;
    }

    private static PolicyBlockInfo Info(ulong key, int depth) => new(new BlockKey(0, new BlockHash(0, key)), depth, 64 << 20);

    private static ulong Next(ref ulong state)
    {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        return state;
    }
}
