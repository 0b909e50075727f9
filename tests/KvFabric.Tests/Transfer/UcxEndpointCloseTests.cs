using System.Collections.Concurrent;
using KvFabric.Memory;
using KvFabric.Transfer;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// ucp.h: an rkey may be destroyed only after the operations using it completed (and before its endpoint is
/// destroyed). Closing an endpoint with gets in flight must therefore force the close first, which completes them, and
/// destroy the rkeys after; with nothing in flight the rkeys go first.
/// </summary>
public sealed class UcxEndpointCloseTests
{
    private const int Bytes = 1 << 20;
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task Remote_keys_used_by_operations_in_flight_are_destroyed_only_after_the_forced_close_completed()
    {
        var settings = new Dictionary<string, string> { ["TLS"] = "tcp" };
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "ucx-initiator", EnableUcx = true, UcxSettings = settings });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = settings });
        Assert.True(initiator.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {initiator.UcxUnavailableReason}");
        using var local = new AnonymousMemory(Bytes);
        using var far = new AnonymousMemory(Bytes);
        var localRegion = initiator.Register(local);
        var farRegion = target.Register(far);
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        var request = initiator.Prepare(TransferOp.Read, [localRegion.Descriptor(0, Bytes)], remote, [farRegion.Descriptor(0, Bytes)],
            new TransferOptions { Backend = BackendKind.Ucx, Deadline = TimeSpan.FromSeconds(1) });

        var events = new ConcurrentQueue<string>();
        var worker = initiator.Ucx!.Worker!;
        worker.Trace = events.Enqueue;
        var targetWorker = target.Ucx!.Worker!;
        using var gate = new ManualResetEventSlim(false);
        using var targetStopped = new ManualResetEventSlim(false);
        // After the key check, the target's progress thread stops: over TCP a get is served by the target's worker, so
        // the post's gets stay in flight until the deadline force-closes the endpoint.
        initiator.Ucx.BeforeIssue = () =>
        {
            targetWorker.Post(() =>
            {
                targetStopped.Set();
                gate.Wait(Generous);
            });
            Assert.True(targetStopped.Wait(Generous));
        };
        try
        {
            var result = await initiator.PostAsync(request).WaitAsync(Generous);
            Assert.Equal(TransferStatus.TimedOut, result.Status);
        }
        finally
        {
            initiator.Ucx.BeforeIssue = null;
            gate.Set();
        }

        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (!events.Any(e => e.StartsWith("rkeys ", StringComparison.Ordinal)) && clock.Elapsed < Generous)
            await Task.Delay(10);
        string[] log = events.ToArray();
        string trace = string.Join(" | ", log);
        int close = Array.FindIndex(log, e => e.StartsWith("close ", StringComparison.Ordinal));
        Assert.True(close >= 0, trace);
        Assert.NotEqual("pending 0", log[close][log[close].IndexOf("pending", StringComparison.Ordinal)..]); // the gets were in flight
        int closed = Array.FindIndex(log, e => e.StartsWith("closed ", StringComparison.Ordinal));
        int destroyed = Array.FindIndex(log, e => e.StartsWith("rkeys ", StringComparison.Ordinal));
        Assert.True(closed > close && destroyed > closed, $"the rkeys must be destroyed after the close completed: {trace}");
        Assert.Equal(0, worker.ClosingEndpoints);

        // The next post reconnects and works.
        worker.Trace = null;
        var again = await initiator.PostAsync(request).WaitAsync(Generous);
        Assert.True(again.IsSuccess, again.ToString());
    }

    [Fact]
    public async Task Remote_keys_of_an_idle_endpoint_are_destroyed_before_it_is_closed()
    {
        var settings = new Dictionary<string, string> { ["TLS"] = "tcp" };
        await using var initiator = new TransferAgent(new TransferAgentOptions { Name = "ucx-initiator", EnableUcx = true, UcxSettings = settings });
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "ucx-target", EnableUcx = true, UcxSettings = settings });
        Assert.True(initiator.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {initiator.UcxUnavailableReason}");
        using var local = new AnonymousMemory(Bytes);
        using var far = new AnonymousMemory(Bytes);
        var localRegion = initiator.Register(local);
        var farRegion = target.Register(far);
        var remote = await initiator.LoadRemoteAsync(target.ExportMetadata());
        var request = initiator.Prepare(TransferOp.Write, [localRegion.Descriptor(0, Bytes)], remote, [farRegion.Descriptor(0, Bytes)],
            new TransferOptions { Backend = BackendKind.Ucx });
        var ok = await initiator.PostAsync(request).WaitAsync(Generous);
        Assert.True(ok.IsSuccess, ok.ToString());

        var events = new ConcurrentQueue<string>();
        initiator.Ucx!.Worker!.Trace = events.Enqueue;
        await initiator.UnloadRemoteAsync(remote).WaitAsync(Generous);
        string[] log = events.ToArray();
        Assert.Equal(3, log.Length);
        Assert.StartsWith("close ", log[0], StringComparison.Ordinal);
        Assert.EndsWith("pending 0", log[0], StringComparison.Ordinal);
        Assert.StartsWith("rkeys ", log[1], StringComparison.Ordinal); // while the endpoint they were unpacked on exists (ucp.h)
        Assert.StartsWith("closed ", log[2], StringComparison.Ordinal);
    }
}
