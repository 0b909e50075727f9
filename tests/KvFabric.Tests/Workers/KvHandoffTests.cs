using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Workers.Handoff;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>The prefill-to-decode KV hand-off over the transfer layer, between two agents on loopback.</summary>
public sealed class KvHandoffTests
{
    private const int BlockBytes = 64 * 1024;

    private sealed class Pair : IAsyncDisposable
    {
        public readonly TransferAgent Prefill = new(new TransferAgentOptions { Name = "prefill" });
        public readonly TransferAgent Decode = new(new TransferAgentOptions { Name = "decode" });
        public readonly HostBlockPool Blocks = new(new HostBlockPoolOptions { SlotBytes = BlockBytes, SlotCount = 8, Tag = "prefill-kv" });
        public HandoffReceiver Receiver = null!;
        public RemoteAgent Remote = null!;

        public static async Task<Pair> StartAsync(int receiverSlots)
        {
            var p = new Pair();
            p.Prefill.Register(p.Blocks);
            p.Receiver = new HandoffReceiver(p.Decode, BlockBytes, receiverSlots);
            p.Remote = await p.Prefill.LoadRemoteAsync(p.Decode.ExportMetadata());
            return p;
        }

        public nint[] Fill(int n, int seed)
        {
            var addresses = new nint[n];
            for (int i = 0; i < n; i++)
            {
                BlockSlot s = Blocks.Rent();
                new Random(seed + i).NextBytes(s.AsSpan());
                addresses[i] = s.Address;
            }

            return addresses;
        }

        public async ValueTask DisposeAsync()
        {
            await Receiver.DisposeAsync();
            await Prefill.DisposeAsync();
            await Decode.DisposeAsync();
            Blocks.Dispose();
        }
    }

    [Theory]
    [InlineData(BackendKind.Tcp)]
    [InlineData(BackendKind.SharedMemory)]
    public async Task The_decode_side_gets_every_byte_when_the_notification_arrives(BackendKind backend)
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 8);
        nint[] blocks = p.Fill(3, seed: 10);
        HandoffTicket ticket = p.Receiver.Reserve(requestId: 42, blocks: 3, TimeSpan.FromSeconds(30));
        Assert.Equal(5, p.Receiver.FreeSlots);
        Task<BlockSlot[]> arrived = p.Receiver.WaitAsync(42, default);
        TransferResult sent = await HandoffSender.SendAsync(p.Prefill, p.Remote, ticket, blocks, backend: backend);
        Assert.True(sent.IsSuccess, sent.ToString());
        BlockSlot[] slots = await arrived.WaitAsync(TimeSpan.FromSeconds(30));
        for (int i = 0; i < 3; i++)
        {
            var expected = new byte[BlockBytes];
            new Random(10 + i).NextBytes(expected);
            Assert.True(slots[i].AsSpan().SequenceEqual(expected), $"block {i}");
        }

        p.Receiver.Release(42);
        Assert.Equal(8, p.Receiver.FreeSlots);
        Assert.Equal(0, p.Receiver.UnknownNotifications);
    }

    [Fact]
    public async Task Reservations_are_bounded_and_checked()
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 4);
        p.Receiver.Reserve(1, 3, TimeSpan.FromSeconds(30));
        var full = Assert.Throws<InvalidOperationException>(() => p.Receiver.Reserve(2, 2, TimeSpan.FromSeconds(30)));
        Assert.Contains("1 of 4", full.Message, StringComparison.Ordinal);
        Assert.Throws<InvalidOperationException>(() => p.Receiver.Reserve(1, 1, TimeSpan.FromSeconds(30)));
        await Assert.ThrowsAsync<InvalidOperationException>(() => p.Receiver.WaitAsync(99, default));
        HandoffTicket other = p.Receiver.Reserve(3, 1, TimeSpan.FromSeconds(30));
        // The wrong number of blocks for a ticket is refused before anything moves.
        await Assert.ThrowsAsync<ArgumentException>(() => HandoffSender.SendAsync(p.Prefill, p.Remote, other, p.Fill(2, 0)));
    }

    [Fact]
    public async Task A_request_whose_kv_never_comes_times_out_and_its_slots_come_back_after_the_lease()
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 4);
        HandoffTicket ticket = p.Receiver.Reserve(7, 2, TimeSpan.FromMilliseconds(200));
        var e = await Assert.ThrowsAsync<TimeoutException>(() => p.Receiver.WaitAsync(7, default));
        Assert.Contains("request 7", e.Message, StringComparison.Ordinal);
        // A sender that comes after the lease does not write at all.
        TransferResult late = await HandoffSender.SendAsync(p.Prefill, p.Remote, ticket, p.Fill(2, 1));
        Assert.Equal(TransferStatus.TimedOut, late.Status);
        // Reclaimed on the next reservation (the lease plus its grace have passed).
        p.Receiver.Reserve(8, 4, TimeSpan.FromSeconds(30));
        Assert.Equal(0, p.Receiver.FreeSlots);
    }

    [Fact]
    public async Task Slots_given_up_before_their_kv_came_show_as_free_once_the_lease_is_over_without_another_reservation()
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 4);
        p.Receiver.Reserve(12, 3, TimeSpan.FromMilliseconds(200));
        p.Receiver.Release(12); // the Decode was cancelled: a WRITE may still come within the lease, so they are kept until then
        Assert.Equal(1, p.Receiver.FreeSlots);
        // No reservation follows (an idle worker): what Status reports must still come back.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (p.Receiver.FreeSlots != 4 && DateTime.UtcNow < deadline)
            await Task.Delay(100);
        Assert.Equal(4, p.Receiver.FreeSlots);
    }

    [Fact]
    public async Task Kv_that_arrives_but_is_never_claimed_is_reclaimed_a_lease_after_it_arrived()
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 4);
        // A lease long enough for a first connection on a loaded machine; what is tested is measured from the arrival.
        HandoffTicket ticket = p.Receiver.Reserve(9, 2, TimeSpan.FromSeconds(2));
        Assert.True((await HandoffSender.SendAsync(p.Prefill, p.Remote, ticket, p.Fill(2, 3))).IsSuccess);
        // The KV is in place, but no decoder ever comes for it (the driver died). Within the lease it is kept ...
        p.Receiver.Reserve(10, 1, TimeSpan.FromSeconds(30));
        Assert.Equal(1, p.Receiver.FreeSlots);
        Assert.Equal(0, p.Receiver.UnclaimedReclaimed);
        // ... and a lease (plus the grace) after it arrived, the next reservation reclaims it.
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (p.Receiver.UnclaimedReclaimed == 0 && DateTime.UtcNow < deadline)
        {
            await Task.Delay(100);
            p.Receiver.Release(11);
            try
            {
                p.Receiver.Reserve(11, 1, TimeSpan.FromSeconds(30));
            }
            catch (InvalidOperationException)
            {
                // no slot free yet: try again once the reclaim happened
            }
        }

        Assert.Equal(1, p.Receiver.UnclaimedReclaimed);
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => p.Receiver.WaitAsync(9, default));
        Assert.Contains("request 9", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public async Task Notifications_for_no_pending_request_are_counted_and_dropped()
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 2);
        await p.Prefill.SendNotificationAsync(p.Remote, HandoffReceiver.Notification(12345, 1, 1));
        await p.Prefill.SendNotificationAsync(p.Remote, "not a hand-off"u8.ToArray());
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (p.Receiver.UnknownNotifications < 2 && DateTime.UtcNow < deadline)
            await Task.Delay(10);
        Assert.Equal(2, p.Receiver.UnknownNotifications);
    }

    [Fact]
    public async Task A_retried_request_is_not_completed_by_the_notification_of_its_earlier_attempt()
    {
        await using Pair p = await Pair.StartAsync(receiverSlots: 4);
        HandoffTicket first = p.Receiver.Reserve(5, 1, TimeSpan.FromSeconds(30));
        p.Receiver.Release(5); // given up while its WRITE may still come: the slot stays out of use until the lease ends
        Assert.Equal(3, p.Receiver.FreeSlots);
        HandoffTicket retry = p.Receiver.Reserve(5, 1, TimeSpan.FromSeconds(30));
        Assert.NotEqual(first.Nonce, retry.Nonce);
        Assert.NotEqual(first.Addresses[0], retry.Addresses[0]);
        Task<BlockSlot[]> arrived = p.Receiver.WaitAsync(5, default);
        Assert.True((await HandoffSender.SendAsync(p.Prefill, p.Remote, first, p.Fill(1, 20))).IsSuccess); // the late first attempt
        var deadline = DateTime.UtcNow + TimeSpan.FromSeconds(20);
        while (p.Receiver.UnknownNotifications < 1 && DateTime.UtcNow < deadline)
            await Task.Delay(10);
        Assert.Equal(1, p.Receiver.UnknownNotifications);
        Assert.False(arrived.IsCompleted);
        Assert.True((await HandoffSender.SendAsync(p.Prefill, p.Remote, retry, p.Fill(1, 30))).IsSuccess);
        BlockSlot[] slots = await arrived.WaitAsync(TimeSpan.FromSeconds(30));
        var expected = new byte[BlockBytes];
        new Random(30).NextBytes(expected);
        Assert.True(slots[0].AsSpan().SequenceEqual(expected));
    }
}
