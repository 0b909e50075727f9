using Xunit;
using static KvFabric.Tests.Tiers.TierTestData;

namespace KvFabric.Tests.Tiers;

public sealed class TierLeaseQueueTests
{
    // Every pin that extends a lease queues an expiry entry; entries must be retired as their leases lapse even when no
    // tier ever fills (before, only a put into a full tier expired leases, so a lightly used node grew without bound).
    [Fact]
    public async Task Renewed_short_pins_do_not_grow_the_lease_queue_while_no_tier_is_full()
    {
        await using var rig = new TierRig([4, 4]);
        await rig.Put(0, 1);
        for (int i = 0; i < 10_000; i++)
        {
            Assert.Equal(1, rig.Manager.Pin(0, [Hash(0)], TimeSpan.FromSeconds(1)));
            rig.Time.Advance(TimeSpan.FromSeconds(2));
        }
        Assert.True(rig.Manager.LeaseQueueLength <= 2, $"{rig.Manager.LeaseQueueLength} lease entries queued for one block");
    }
}
