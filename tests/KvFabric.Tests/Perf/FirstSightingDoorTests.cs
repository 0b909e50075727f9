using KvFabric.Bench.Replay;
using KvFabric.Tiers;
using KvFabric.Tiers.Policies;
using KvFabric.Tiers.Replay;
using Xunit;
using static KvFabric.Tests.Tiers.PolicyTestSupport;

namespace KvFabric.Tests.Perf;

public sealed class FirstSightingDoorTests
{
    private static long HitTokens(ReplayTrace trace, HashSet<ulong>? admitted)
    {
        IEvictionPolicy policy = PolicyFactory.Create("lru", 1, 4);
        if (admitted is not null)
            policy = new FirstSightingDoor(policy, admitted);
        return ReplayRunner.Run(trace, new PolicySimulatorCache([new SimulatedTier(TierKind.Host, 1, policy)], BlockBytes)).HitTokens;
    }

    [Fact]
    public void Listed_first_sightings_enter_others_wait_for_the_inner_policy()
    {
        // One block of room, 4-token blocks: [1], [2], [2], [3], [2]. Block 1 fills the empty tier (nobody is asked).
        var trace = Trace(4, [1], [2], [2], [3], [2]);
        // Plain LRU takes 2, hits it, then takes 3 over it: only request 2 hits.
        Assert.Equal(4, HitTokens(trace, admitted: null));
        // The door admits 2 at its first sighting and refuses 3: requests 2 and 4 hit.
        Assert.Equal(8, HitTokens(trace, [2]));
        // Nothing listed: 2 is refused at first, enters at its second sighting (LRU's answer), and only request 4 hits.
        Assert.Equal(4, HitTokens(trace, []));
    }

    [Fact]
    public void A_list_line_that_is_not_a_block_id_is_refused_with_its_line_number()
    {
        string path = Path.GetTempFileName();
        try
        {
            File.WriteAllLines(path, ["12", "", "x7"]);
            var e = Assert.Throws<InvalidDataException>(() => FirstSightingDoor.Load(path));
            Assert.Contains("line 3", e.Message, StringComparison.Ordinal);
            File.WriteAllLines(path, ["12", "", "7"]);
            Assert.Equal([7UL, 12UL], FirstSightingDoor.Load(path).Order());
        }
        finally
        {
            File.Delete(path);
        }
    }
}
