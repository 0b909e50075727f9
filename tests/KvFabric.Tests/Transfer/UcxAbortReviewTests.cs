using KvFabric.Memory;
using KvFabric.Memory.Device;
using KvFabric.Transfer;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// A UCX post whose operations do not complete after the abort force-closed their endpoint: UCX may still write into
/// the request's memory, so the post reports a clear error and that memory stays quarantined (its regions held,
/// deregistration refused, the request still posted) until UCX completes them, rather than hanging or being freed.
/// </summary>
public sealed class UcxAbortReviewTests
{
    private const int Bytes = 1 << 20;
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    [Theory]
    [InlineData(TransferOp.Read)]
    [InlineData(TransferOp.Write)]
    public async Task An_abort_UCX_does_not_complete_quarantines_the_memory_and_reports_it(TransferOp op)
    {
        var settings = new Dictionary<string, string> { ["TLS"] = "tcp" };
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "ucx-initiator", EnableUcx = true, UcxSettings = settings });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = settings });
        Assert.True(initiator.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {initiator.UcxUnavailableReason}");
        using var source = new AnonymousMemory(Bytes);
        using var destination = new AnonymousMemory(Bytes);
        var local = initiator.Register(source);
        var far = target.Register(destination);
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        var request = initiator.Prepare(op, [local.Descriptor(0, Bytes)], remote, [far.Descriptor(0, Bytes)],
            new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(2) });

        // One operation of the post stays in flight past the force-close, as a stuck UCX transport would keep it.
        await WithOneOperationHeldAsync(initiator, async () =>
        {
            var result = await initiator.PostAsync(request).WaitAsync(Generous);
            Assert.Equal(TransferStatus.TimedOut, result.Status);
            Assert.Contains("quarantined", result.Error, StringComparison.Ordinal);
            Assert.True(request.IsPosted, "the request was released while UCX may still use its memory");
            await Assert.ThrowsAsync<InvalidOperationException>(() => initiator.PostAsync(request));
            var refused = await Assert.ThrowsAsync<TimeoutException>(() => initiator.DeregisterAsync(local, TimeSpan.FromMilliseconds(50)));
            Assert.Contains("still in use", refused.Message, StringComparison.Ordinal);
        });

        // UCX completed the operation: the quarantine lifts by itself.
        await WaitUntilUnpostedAsync(request);
        Assert.Equal(TransferStatus.TimedOut, request.LastResult!.Value.Status);
        // The post let go of its region: nothing uses it any more.
        await local.CloseAsync(Generous);
    }

    [Fact]
    public async Task Device_staging_slots_of_a_quarantined_post_are_not_reused_until_UCX_completes()
    {
        var settings = new Dictionary<string, string> { ["TLS"] = "tcp" };
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "gpu-ucx", EnableUcx = true, UcxSettings = settings });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = settings });
        Assert.True(initiator.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {initiator.UcxUnavailableReason}");
        using var device = new EmulatedDeviceMemory(4 << 20);
        var kv = initiator.Register(device, device.Allocate(Bytes));
        using var destination = new AnonymousMemory(Bytes);
        var far = target.Register(destination);
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        var request = initiator.Prepare(TransferOp.Read, [kv.Descriptor(0, Bytes)], remote, [far.Descriptor(0, Bytes)],
            new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(2) });
        int slots = initiator.Staging.Available;

        await WithOneOperationHeldAsync(initiator, async () =>
        {
            var result = await initiator.PostAsync(request).WaitAsync(Generous);
            Assert.Equal(TransferStatus.TimedOut, result.Status);
            Assert.Contains("quarantined", result.Error, StringComparison.Ordinal);
            Assert.Equal(slots - 1, initiator.Staging.Available);
        });

        await WaitUntilUnpostedAsync(request);
        Assert.Equal(slots, initiator.Staging.Available);
        // The request points at device memory again and can be posted as before.
        Assert.True((await initiator.PostAsync(request).WaitAsync(Generous)).IsSuccess);
    }

    // Runs the body while one UCX operation of the next post stays in flight past its abort (a short abort timeout), then
    // lets UCX complete it.
    private static async Task WithOneOperationHeldAsync(TransferAgent initiator, Func<Task> body)
    {
        var ucx = initiator.Ucx!;
        ucx.AbortTimeout = TimeSpan.FromMilliseconds(200);
        var heldRelease = new TaskCompletionSource<Action>(TaskCreationOptions.RunContinuationsAsynchronously);
        ucx.HoldOperation = release => heldRelease.TrySetResult(release);
        try
        {
            await body();
            await heldRelease.Task.WaitAsync(Generous); // the post did hold one operation
        }
        finally
        {
            ucx.HoldOperation = null;
            if (heldRelease.Task.IsCompletedSuccessfully)
                heldRelease.Task.Result();
        }
    }

    private static async Task WaitUntilUnpostedAsync(TransferRequest request)
    {
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (request.IsPosted && clock.Elapsed < Generous)
            await Task.Delay(10);
        Assert.False(request.IsPosted, "the quarantine never lifted after UCX completed the operation");
    }
}
