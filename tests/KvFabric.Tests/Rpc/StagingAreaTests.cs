using KvFabric.Service;
using Xunit;

namespace KvFabric.Tests.Rpc;

public sealed class StagingAreaTests
{
    // On a node shared by tenants, one tenant's reservations (and the exports of its blocks) stop at its share, so the
    // others still find slots; released slots count again at once.
    [Fact]
    public void One_tenant_holds_at_most_its_share_of_the_staging_slots()
    {
        using var staging = new StagingArea(4096, 8, perTenant: 5);
        var (first, _, _) = staging.Reserve(1, 4, TimeSpan.FromMinutes(1));
        var e = Assert.Throws<StoreFullException>(() => staging.Reserve(1, 2, TimeSpan.FromMinutes(1)));
        Assert.Contains("staging_slots_per_tenant", e.Message, StringComparison.Ordinal);
        Assert.Equal(4, staging.Available); // nothing was taken by the refused call
        staging.Reserve(2, 4, TimeSpan.FromMinutes(1)); // another tenant still gets the rest
        Assert.Equal(4, staging.HeldBy(1));
        Assert.True(staging.Release(1, first));
        Assert.Equal(0, staging.HeldBy(1));
        staging.Reserve(1, 4, TimeSpan.FromMinutes(1));
        Assert.Throws<ArgumentOutOfRangeException>(() => new StagingArea(4096, 8, perTenant: 9));
    }

    [Fact]
    public void Without_a_share_one_tenant_may_take_every_slot()
    {
        using var staging = new StagingArea(4096, 4);
        staging.Reserve(1, 4, TimeSpan.FromMinutes(1));
        Assert.Equal(0, staging.Available);
        Assert.Throws<StoreFullException>(() => staging.Reserve(2, 1, TimeSpan.FromMinutes(1)));
    }

    // A fetch stores blocks straight from its staging slots (IPutBatch.AddBorrowed) and may outlive the server's stop:
    // disposal must not unmap memory a call still reads.
    [Fact]
    public async Task Disposal_waits_for_calls_still_using_slots()
    {
        var staging = new StagingArea(4096, 2);
        var (id, _, _) = staging.Reserve(1, 1, TimeSpan.FromMinutes(1));
        var scope = staging.Use(1, id);
        Task disposed = Task.Run(staging.Dispose);
        await Task.Delay(300);
        Assert.False(disposed.IsCompleted, "the slots were unmapped under a call still using them");
        scope.Slot(0).Span.Fill(7); // still mapped
        scope.Dispose();
        await disposed.WaitAsync(TimeSpan.FromSeconds(30));
        Assert.False(staging.LeftMapped);
    }

    [Fact]
    public void Disposal_leaves_the_memory_mapped_when_a_call_never_lets_go()
    {
        var staging = new StagingArea(4096, 2) { DisposeWait = TimeSpan.FromMilliseconds(100) };
        var (id, _, _) = staging.Reserve(1, 1, TimeSpan.FromMinutes(1));
        var scope = staging.Use(1, id);
        staging.Dispose();
        Assert.True(staging.LeftMapped);
        scope.Slot(0).Span.Fill(7); // a late call writes into memory that is still there, not into an unmapped page
        scope.Dispose();
        staging.Pool.Dispose(); // the test's own cleanup of what disposal left
    }
}
