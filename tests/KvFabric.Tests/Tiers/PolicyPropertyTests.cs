using FsCheck;
using FsCheck.Fluent;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Tiers;

// Random operation sequences against a model of what the tier manager knows: which handles are resident and which are
// evictable. Every policy must only ever name a resident, evictable handle, must name one whenever one exists, and must
// survive any number of evictability toggles and handle reuses. LRU must name exactly the least recently used one.
public sealed class PolicyPropertyTests
{
    private const int Handles = 12;

    private static readonly Arbitrary<(int Op, int Handle, int Depth)[]> Ops =
        (from op in Gen.Choose(0, 5)
         from handle in Gen.Choose(0, Handles - 1)
         from depth in Gen.Choose(0, 40)
         select (op, handle, depth)).ArrayOf().ToArbitrary();

    private static bool Holds(IEvictionPolicy policy, (int Op, int Handle, int Depth)[] ops, bool exactLru)
    {
        var resident = new bool[Handles];
        var evictable = new bool[Handles];
        var lastUse = new long[Handles];
        long clock = 0;
        ulong nextKey = 1;
        foreach (var (op, h, depth) in ops)
        {
            switch (op)
            {
                case 0 when !resident[h]:
                    ulong key = depth % 3 == 0 ? (ulong)h + 1000 : nextKey++; // some keys come back
                    policy.ShouldAdmit(Info(key, depth));
                    policy.OnAdmit(h, Info(key, depth));
                    resident[h] = true;
                    evictable[h] = false;
                    lastUse[h] = ++clock;
                    break;
                case 1 when resident[h]:
                    policy.OnAccess(h);
                    lastUse[h] = ++clock;
                    break;
                case 2 when resident[h]:
                    policy.OnRemove(h);
                    resident[h] = false;
                    evictable[h] = false;
                    break;
                case 3 when resident[h]:
                case 4 when resident[h]:
                    policy.SetEvictable(h, op == 3);
                    evictable[h] = op == 3;
                    break;
                case 5:
                    bool any = evictable.Any(e => e);
                    if (policy.TryPickVictim(out int v) != any)
                        return false;
                    if (!any)
                        break;
                    if (!resident[v] || !evictable[v])
                        return false;
                    if (exactLru && Enumerable.Range(0, Handles).Any(o => evictable[o] && lastUse[o] < lastUse[v]))
                        return false;
                    policy.OnRemove(v);
                    resident[v] = false;
                    evictable[v] = false;
                    break;
            }
        }
        return true;
    }

    [Fact]
    public void Lru_always_picks_the_least_recently_used_evictable_handle() =>
        Prop.ForAll(Ops, ops => Holds(new LruPolicy(4), ops, exactLru: true))
            .Check(Config.QuickThrowOnFailure.WithMaxTest(300).WithReplay(FixedSeed()));

    [Fact]
    public void Cost_aware_only_picks_resident_evictable_handles() =>
        Prop.ForAll(Ops, ops => Holds(new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = 6, TokensPerBlock = 16 }), ops, exactLru: false))
            .Check(Config.QuickThrowOnFailure.WithMaxTest(300).WithReplay(FixedSeed()));

    [Fact]
    public void Seen_twice_over_cost_aware_only_picks_resident_evictable_handles() =>
        Prop.ForAll(Ops, ops => Holds(new SeenTwiceAdmission(new CostAwarePolicy(new CostAwareOptions { ExpectedBlocks = 6 }), 6), ops, exactLru: false))
            .Check(Config.QuickThrowOnFailure.WithMaxTest(200).WithReplay(FixedSeed()));

    // A fixed seed: the same cases every run.
    private static Microsoft.FSharp.Core.FSharpOption<FsCheck.Replay> FixedSeed() =>
        Microsoft.FSharp.Core.FSharpOption<FsCheck.Replay>.Some(
            new FsCheck.Replay(new FsCheck.Rnd(0x5EED_0001UL, 0x9E37_79B9_7F4A_7C15UL), Microsoft.FSharp.Core.FSharpOption<int>.None));
}
