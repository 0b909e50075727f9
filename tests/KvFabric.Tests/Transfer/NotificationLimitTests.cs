using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// Notifications are capped at 1 MiB on every backend (sender refuses, target drops without buffering), and the
/// target's queue holds at most NotificationQueueBytes of them besides NotificationQueueCapacity messages.
/// </summary>
public sealed class NotificationLimitTests
{
    private const int Limit = 1 << 20;
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);
    private static readonly Dictionary<string, string> Tcp = new() { ["TLS"] = "tcp" };

    [Fact]
    public async Task A_UCX_notification_over_1_MiB_is_refused_by_the_sender_with_the_limit_named()
    {
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "ucx-initiator", EnableUcx = true, UcxSettings = Tcp });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = Tcp });
        Assert.True(initiator.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {initiator.UcxUnavailableReason}");
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());

        var (status, error) = await initiator.Ucx!.NotifyAsync(remote, new byte[Limit + 1], CancellationToken.None).WaitAsync(Generous);
        Assert.NotEqual(WireStatus.Ok, status);
        Assert.Contains($"{Limit}-byte", error, StringComparison.Ordinal);
        Assert.Equal(0, target.Stats.RefusedNotifications); // nothing was sent

        // At the limit it goes through.
        (status, error) = await initiator.Ucx.NotifyAsync(remote, new byte[Limit], CancellationToken.None).WaitAsync(Generous);
        Assert.True(status == WireStatus.Ok, error);
        Assert.True(target.Notifications.TryRead(out var n));
        Assert.Equal(Limit, n.Message.Length);
    }

    [Fact]
    public async Task A_UCX_notification_over_1_MiB_from_a_peer_that_ignores_the_limit_is_refused_and_not_queued()
    {
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "ucx-initiator", EnableUcx = true, UcxSettings = Tcp });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = Tcp });
        Assert.True(initiator.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {initiator.UcxUnavailableReason}");
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());

        var (status, _) = await initiator.Ucx!.SendNotifyAsync(remote, new byte[Limit + 1], CancellationToken.None).WaitAsync(Generous);
        Assert.Equal(WireStatus.Malformed, status);
        Assert.Equal(1, target.Stats.RefusedNotifications);
        Assert.False(target.Notifications.TryRead(out _));
    }

    [Fact]
    public async Task Notifications_beyond_the_queue_byte_budget_are_refused_until_the_reader_drains_them()
    {
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "initiator" });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", NotificationQueueBytes = 2 * Limit });
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());

        Assert.True((await initiator.SendNotificationAsync(remote, new byte[Limit]).WaitAsync(Generous)).IsSuccess);
        Assert.True((await initiator.SendNotificationAsync(remote, new byte[Limit]).WaitAsync(Generous)).IsSuccess);
        var refused = await initiator.SendNotificationAsync(remote, new byte[1]).WaitAsync(Generous);
        Assert.Equal(TransferStatus.Failed, refused.Status);
        Assert.Contains("queue is full", refused.Error, StringComparison.Ordinal);
        Assert.Equal(1, target.Stats.RefusedNotifications);

        // Reading one gives its bytes back to the budget.
        var first = await target.Notifications.ReadAsync().AsTask().WaitAsync(Generous);
        Assert.Equal(Limit, first.Message.Length);
        Assert.True((await initiator.SendNotificationAsync(remote, new byte[Limit]).WaitAsync(Generous)).IsSuccess);
        Assert.Equal(2, target.Notifications.Count);
    }

    [Fact]
    public void A_byte_budget_smaller_than_one_notification_is_refused()
    {
        Assert.Throws<ArgumentOutOfRangeException>(() => new TransferAgent(new TransferAgentOptions { NotificationQueueBytes = Limit - 1 }));
    }
}
