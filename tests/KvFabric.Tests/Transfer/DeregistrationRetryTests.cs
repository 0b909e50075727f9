using System.Net.Sockets;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Tcp;
using Xunit;
using static KvFabric.Tests.Transfer.TcpStallReviewTests;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// A deregistration that times out changes nothing but closing the region to new transfers: the region stays
/// registered (and mapped for UCX) until a retried DeregisterAsync sees the last transfer end, so the caller learns
/// when the memory is safe to free. A raw TCP initiator that sends a WRITE header and only part of its payload holds
/// the region deterministically (the target's session is inside the frame, with the region acquired).
/// </summary>
public sealed class DeregistrationRetryTests
{
    private static readonly TimeSpan Bound = TimeSpan.FromSeconds(60);

    /// <summary>Starts a 4 KiB WRITE into the region, sends 100 bytes of it and waits until they landed: the target holds the region.</summary>
    private static async Task<TcpClient> HoldRegionAsync(TransferAgent target, RegisteredRegion region, Func<int, byte> byteAt)
    {
        var client = new TcpClient();
        var stream = await HandshakeAsync(client, target);
        await SendAsync(stream, new FrameHeader { Type = FrameType.Write, RequestId = 1, RegionId = region.Id, RegionKey = region.Key.Value, Length = 4096 },
            Enumerable.Repeat((byte)0xAB, 100).ToArray());
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (byteAt(99) != 0xAB)
        {
            Assert.True(clock.Elapsed < Bound, "the partial WRITE never landed");
            await Task.Delay(10);
        }
        return client;
    }

    // The reviewer's reproduction (XferReviewTests): before the fix the second DeregisterAsync threw "is not registered
    // with this agent", because the first had removed the region before it timed out.
    [Fact]
    public async Task A_deregistration_that_timed_out_can_be_retried_once_the_transfer_ended()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromSeconds(30) });
        using var memory = new AnonymousMemory(64 * 1024);
        var region = target.Register(memory);
        var client = new TcpClient();
        var stream = await HandshakeAsync(client, target);
        await SendAsync(stream, new FrameHeader { Type = FrameType.Write, RequestId = 1, RegionId = region.Id, RegionKey = region.Key.Value, Length = 4096 },
            Enumerable.Repeat((byte)0xAB, 100).ToArray());
        var clock = System.Diagnostics.Stopwatch.StartNew();
        while (memory.GetSpan(99, 1)[0] != 0xAB)
        {
            Assert.True(clock.Elapsed < Bound);
            await Task.Delay(10);
        }
        await Assert.ThrowsAsync<TimeoutException>(() => target.DeregisterAsync(region, TimeSpan.FromMilliseconds(200)));
        client.Dispose(); // the transfer ends: the session releases the region
        await Task.Delay(500);
        await target.DeregisterAsync(region, TimeSpan.FromSeconds(5)); // threw "is not registered with this agent"
    }

    [Fact]
    public async Task A_timed_out_deregistration_says_what_to_do_and_keeps_the_region_closed_but_registered()
    {
        await using var target = new TransferAgent(new TransferAgentOptions { Name = "target", StallTimeout = TimeSpan.FromSeconds(30) });
        using var memory = new AnonymousMemory(64 * 1024);
        var region = target.Register(memory);
        using var client = await HoldRegionAsync(target, region, i => memory.GetSpan(i, 1)[0]);

        var e = await Assert.ThrowsAsync<TimeoutException>(() => target.DeregisterAsync(region, TimeSpan.FromMilliseconds(100)));
        Assert.Contains($"a transfer still uses region {region.Id}", e.Message, StringComparison.Ordinal);
        Assert.Contains("retry DeregisterAsync, and do not free or reuse the memory until it returns", e.Message, StringComparison.Ordinal);
        // Closed to new transfers and to export, yet still known to the agent (a retry finds it).
        Assert.DoesNotContain(region, target.Regions);
        Assert.Throws<TransferException>(() => target.GetMetadata([region]));
        Assert.True(target.Registry.Contains(region));
        Assert.False(region.TryAcquire());
        // Retried while still held: it times out again, the same way.
        await Assert.ThrowsAsync<TimeoutException>(() => target.DeregisterAsync(region, TimeSpan.FromMilliseconds(100)));

        // A retry that is already waiting when the transfer ends returns then (woken, not at its bound).
        var retry = target.DeregisterAsync(region, Bound);
        Assert.False(retry.IsCompleted);
        client.Dispose();
        await retry.WaitAsync(Bound);
        Assert.False(target.Registry.Contains(region));
        await Assert.ThrowsAsync<TransferException>(() => target.DeregisterAsync(region));
    }

    [Fact]
    public async Task A_retried_deregistration_unmaps_the_region_from_UCX_only_once_the_transfer_ended()
    {
        await using var target = new TransferAgent(new TransferAgentOptions
        {
            Name = "ucx-target", EnableUcx = true, UcxSettings = new Dictionary<string, string> { ["TLS"] = "tcp" }, StallTimeout = TimeSpan.FromSeconds(30),
        });
        Assert.True(target.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {target.UcxUnavailableReason}");
        using var memory = new AnonymousMemory(64 * 1024);
        var region = target.Register(memory);
        Assert.NotNull(target.Ucx!.RkeyOf(region.Id));
        using var client = await HoldRegionAsync(target, region, i => memory.GetSpan(i, 1)[0]);

        await Assert.ThrowsAsync<TimeoutException>(() => target.DeregisterAsync(region, TimeSpan.FromMilliseconds(100)));
        Assert.NotNull(target.Ucx.RkeyOf(region.Id)); // still mapped: a retry unmaps it

        // Two deregistrations wait at once: both return, and only after the region left the registry and UCX.
        var first = target.DeregisterAsync(region, Bound);
        var second = target.DeregisterAsync(region, Bound);
        client.Dispose();
        await Task.WhenAll(first, second).WaitAsync(Bound);
        Assert.Null(target.Ucx.RkeyOf(region.Id));
        Assert.False(target.Registry.Contains(region));
    }

    [Fact]
    public async Task Disposing_the_agent_frees_a_UCX_allocation_whose_deregistration_timed_out_and_a_retry_then_returns()
    {
        var target = new TransferAgent(new TransferAgentOptions
        {
            Name = "ucx-target", EnableUcx = true, UcxSettings = new Dictionary<string, string> { ["TLS"] = "tcp" }, StallTimeout = TimeSpan.FromSeconds(30),
        });
        Assert.True(target.UcxAvailable, $"UCX must be installed for these tests (scripts/install-prereqs.sh): {target.UcxUnavailableReason}");
        var memory = target.AllocateUcx(64 * 1024);
        var region = memory.Region;
        using var client = await HoldRegionAsync(target, region, i => memory.GetSpan(i, 1)[0]);
        await Assert.ThrowsAsync<TimeoutException>(() => target.DeregisterAsync(region, TimeSpan.FromMilliseconds(100)));
        Assert.Throws<TransferException>(() => target.Register(memory)); // being deregistered: not handed out again

        await target.DisposeAsync().AsTask().WaitAsync(Bound);
        Assert.Throws<ObjectDisposedException>(() => memory.Address); // the agent's disposal freed it
        Assert.Null(target.Ucx!.RkeyOf(region.Id));
        client.Dispose();
        // The retry finds the region, waits for the session to let go, and does not touch the disposed UCX worker.
        await target.DeregisterAsync(region, Bound).WaitAsync(Bound);
    }
}
