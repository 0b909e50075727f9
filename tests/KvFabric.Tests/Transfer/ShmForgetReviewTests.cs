using KvFabric.Memory;
using KvFabric.Transfer;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>
/// Unloading or reloading a peer while a shared-memory copy into its segment is running must not unmap the segment
/// under the copy (that would be a SIGSEGV): the mapping goes only when the last copy through it is done.
/// </summary>
public sealed class ShmForgetReviewTests
{
    private const int Bytes = 64 * 1024;
    private static readonly TimeSpan Generous = TimeSpan.FromSeconds(60);

    private sealed class Rig : IAsyncDisposable
    {
        public readonly TransferAgent Peer = new(new TransferAgentOptions { Name = "peer" });
        public readonly TransferAgent Agent = new(new TransferAgentOptions { Name = "initiator" });
        public readonly MappedMemory Segment = SharedMemorySegment.Create(Bytes, "forget");
        public readonly AnonymousMemory Local = new(Bytes);
        public RemoteAgent Remote = null!;
        public byte[] Metadata = [];

        public async Task StartAsync()
        {
            Peer.Register(Segment);
            Agent.Register(Local);
            Local.GetSpan(0, Bytes).Fill(0xC3);
            Metadata = Peer.ExportMetadata();
            Remote = await Agent.LoadRemoteAsync(Metadata);
            // Forgetting gives posts no grace: only the reference count keeps the mapping.
            Agent.ForgetDrainTimeout = TimeSpan.Zero;
        }

        public TransferRequest Write(RemoteAgent remote) => Agent.Prepare(TransferOp.Write, [MemoryDescriptor.Of(Local.Address, Bytes)], remote,
            [new MemoryDescriptor((ulong)Segment.Address, Bytes)],
            new TransferOptions { Backend = BackendKind.SharedMemory, Deadline = TimeSpan.FromHours(1), Streams = 1 });

        public async ValueTask DisposeAsync()
        {
            Agent.Shm.BeforeCopy = null;
            await Agent.DisposeAsync();
            await Peer.DisposeAsync();
            Local.Dispose();
            Segment.Dispose();
        }
    }

    [Theory]
    [InlineData(false)]
    [InlineData(true)]
    public async Task Forgetting_a_peer_never_unmaps_a_segment_a_copy_is_using(bool reload)
    {
        await using var rig = new Rig();
        await rig.StartAsync();
        using var entered = new ManualResetEventSlim();
        using var proceed = new ManualResetEventSlim();
        MappedMemory? held = null;
        rig.Agent.Shm.BeforeCopy = map =>
        {
            held = map;
            entered.Set();
            Assert.True(proceed.Wait(Generous), "the test never let the copy go on");
            // Never copy through an unmapped segment, so a regression fails here instead of killing the test host.
            if (map.IsDisposed)
                throw new InvalidOperationException("the peer's segment was unmapped while a copy was about to use it");
        };
        var request = rig.Write(rig.Remote);
        var post = rig.Agent.PostAsync(request);
        Assert.True(entered.Wait(Generous), "the copy never started");

        // The copy is held in progress; unloading (or reloading) the peer must return without unmapping its segment.
        if (reload)
            await rig.Agent.LoadRemoteAsync(rig.Metadata).WaitAsync(Generous);
        else
            await rig.Agent.UnloadRemoteAsync(rig.Remote).WaitAsync(Generous);
        Assert.False(held!.IsDisposed, "forgetting the peer unmapped a segment a copy was still using");

        proceed.Set();
        var result = await post.WaitAsync(Generous);
        Assert.True(result.Status is TransferStatus.Success or TransferStatus.Failed, $"{result.Status}: {result.Error}");
        Assert.Null(request.FirstError is { } e && e.Contains("unmapped", StringComparison.Ordinal) ? e : null);
        Assert.All(rig.Segment.GetSpan(0, Bytes).ToArray(), b => Assert.Equal(0xC3, b));
        // The last user is done: the forgotten mapping is gone, not leaked.
        Assert.True(held.IsDisposed, "the forgotten peer's mapping outlived its last copy");
    }

    [Fact]
    public async Task After_a_reload_new_posts_use_a_fresh_mapping_and_the_old_view_is_refused()
    {
        await using var rig = new Rig();
        await rig.StartAsync();
        MappedMemory? first = null;
        rig.Agent.Shm.BeforeCopy = map => first ??= map;
        Assert.True((await rig.Agent.PostAsync(rig.Write(rig.Remote))).IsSuccess);
        var stale = rig.Write(rig.Remote);

        var fresh = await rig.Agent.LoadRemoteAsync(rig.Metadata);
        Assert.True(first!.IsDisposed, "no copy used the old mapping, so forgetting the peer unmaps it at once");
        var old = await rig.Agent.PostAsync(stale);
        Assert.Equal(TransferStatus.Failed, old.Status);
        Assert.Contains("unloaded or reloaded", old.Error, StringComparison.Ordinal);

        MappedMemory? second = null;
        rig.Agent.Shm.BeforeCopy = map => second ??= map;
        rig.Segment.GetSpan(0, Bytes).Clear();
        var result = await rig.Agent.PostAsync(rig.Write(fresh));
        Assert.True(result.IsSuccess, result.Error);
        Assert.NotSame(first, second);
        Assert.False(second!.IsDisposed);
        Assert.All(rig.Segment.GetSpan(0, Bytes).ToArray(), b => Assert.Equal(0xC3, b));
    }
}
