using KvFabric.Rpc.V1;
using KvFabric.Workers.Driver;
using Xunit;

namespace KvFabric.Tests.Workers;

public sealed class RequestDriverLeaseTests
{
    [Fact]
    public void The_prefill_gets_the_lease_left_since_the_reserve_not_the_whole_lease()
    {
        var ticket = new HandoffReservation { RequestId = 3, Nonce = 9, LeaseMs = 60_000 };
        HandoffReservation sent = RequestDriver.LeaseLeft(ticket, TimeSpan.FromMilliseconds(2_500.2));
        // The prefill side counts its WRITE's deadline from when it gets the ticket: it must end inside the decode side's lease.
        Assert.Equal(57_499u, sent.LeaseMs);
        Assert.Equal(9ul, sent.Nonce);
        Assert.Equal(60_000u, ticket.LeaseMs); // the reservation itself is untouched
        // A lease already over leaves the least there is: the prefill refuses it rather than computing in vain.
        Assert.Equal(1u, RequestDriver.LeaseLeft(ticket, TimeSpan.FromMinutes(2)).LeaseMs);
    }
}
