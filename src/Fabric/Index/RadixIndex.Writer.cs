using System.Diagnostics;
using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Index;

// The writer thread: drains the queue in batches, each under the write lock for at most MaxWriteHold. A bad event is
// counted by reason and dropped; nothing an event carries can stop the thread.
public sealed partial class RadixIndex
{
    private readonly long[] _rejected = new long[RejectReasons.Count];
    private readonly List<TaskCompletionSource> _batchFlushes = [];
    private BlockHash[] _hashScratch = new BlockHash[256];
    private long _appliedEvents;
    private long _appliedBlocks;
    private long _removedNotHeldNoTenant;
    private string? _lastError;

    private void WriterLoop()
    {
        var reader = _queue.Reader;
        while (!_stop.IsCancellationRequested)
        {
            if (reader.Count == 0 && !WaitForWork())
                break;
            ApplyBatch();
        }
    }

    // Blocks until an item is queued; false once the index is disposed.
    private bool WaitForWork()
    {
        try
        {
            var wait = _queue.Reader.WaitToReadAsync(_stop.Token);
            return wait.IsCompletedSuccessfully ? wait.Result : wait.AsTask().GetAwaiter().GetResult();
        }
        catch (OperationCanceledException)
        {
            return false;
        }
    }

    private void ApplyBatch()
    {
        // A tree near its rehash load gets its doubled index built here, outside the lock: only this thread changes
        // trees, so it can read one while readers Match; swapping it in under the lock takes microseconds.
        PrepareGrowths();
        if (!_lock.TryEnterWriteLock(_options.LockTimeout))
            return; // readers held it past the deadline; try again, the events (and any index built ahead) stay

        long start = Stopwatch.GetTimestamp();
        try
        {
            foreach (var (tree, prepared) in _growths)
            {
                if (tree.CommitGrowth(prepared))
                    Interlocked.Increment(ref _grownAhead);
            }
            _growths.Clear();
            while (_queue.Reader.TryRead(out var item))
            {
                if (item.Flush is { } flush)
                    _batchFlushes.Add(flush);
                else if (item.RemoveNode is { } node)
                    RemoveNodeNow(node);
                else
                    Apply(item.Event);
                if (Stopwatch.GetElapsedTime(start) > _options.MaxWriteHold)
                    break;
            }
        }
        finally
        {
            _lock.ExitWriteLock();
        }
        LetWaitingReadersIn();
        foreach (var flush in _batchFlushes)
            flush.TrySetResult();
        _batchFlushes.Clear();
    }

    private readonly List<(RadixTree Tree, RadixTree.PreparedIndex Prepared)> _growths = [];
    private long _grownAhead;
    private long _growthRetryAt; // after a failed growth-ahead (no memory), not before this timestamp

    /// <summary>Index rehashes done ahead by the writer, outside the readers' lock.</summary>
    public long GrowthsAhead => Interlocked.Read(ref _grownAhead);

    private long _growthFailures;

    /// <summary>Growths ahead that failed (no memory for the bigger index); the events then grew the index themselves.</summary>
    public long GrowthFailures => Interlocked.Read(ref _growthFailures);

    // Builds, outside the lock, the doubled index of each tree near its rehash load (one kept from a batch that could
    // not get the lock is reused).
    private void PrepareGrowths()
    {
        if (Stopwatch.GetTimestamp() < _growthRetryAt)
            return;
        try
        {
            foreach (var tree in _trees.Values)
            {
                if (tree.GrowthDue && !_growths.Exists(g => ReferenceEquals(g.Tree, tree)))
                    _growths.Add((tree, tree.PrepareGrowth()));
            }
        }
#pragma warning disable CA1031 // growing ahead is an optimisation: if it fails (no memory), the event that needs the room grows in the lock, or is counted as failed
        catch (Exception)
#pragma warning restore CA1031
        {
            // Not again for a second (each try may cost a whole copy); counted apart from the events' errors.
            _growthRetryAt = Stopwatch.GetTimestamp() + Stopwatch.Frequency;
            Interlocked.Increment(ref _growthFailures);
        }
    }

    // The lock prefers writers, and this thread asks for it again right after releasing it: with events queued without
    // a pause, a reader woken by the release would find it taken again and wait for as long as the queue stays full
    // (seconds, measured). So readers already waiting get up to MaxWriteHold to enter before the next batch.
    private void LetWaitingReadersIn()
    {
        if (_lock.WaitingReadCount == 0)
            return;
        long start = Stopwatch.GetTimestamp();
        while (_lock.WaitingReadCount > 0 && Stopwatch.GetElapsedTime(start) < _options.MaxWriteHold)
            Thread.Yield();
    }

    // At disposal (the writer has stopped): indexes built ahead and never installed give their memory back.
    private void DiscardGrowths()
    {
        foreach (var (_, prepared) in _growths)
            prepared.Dispose();
        _growths.Clear();
    }

    private void Apply(IndexEvent e)
    {
        try
        {
            var reason = ApplyOrReject(in e);
            if (reason is { } r)
                Interlocked.Increment(ref _rejected[(int)r]);
        }
#pragma warning disable CA1031 // a bad event must never stop the writer: count it, keep the message, carry on
        catch (Exception ex)
#pragma warning restore CA1031
        {
            Interlocked.Increment(ref _rejected[(int)RejectReason.Exception]);
            Volatile.Write(ref _lastError, $"{e.Kind} event for tenant {e.Tenant}, worker {e.Worker}: {ex.GetType().Name}: {ex.Message}");
        }
    }

    private RejectReason? ApplyOrReject(in IndexEvent e)
    {
        if ((uint)e.Worker > RadixTree.MaxWorkerId)
            return RejectReason.Worker;
        if (e.Tier is { } tier && (byte)tier > (byte)TierKind.Ssd)
            return RejectReason.Tier;
        if (e.Kind == IndexEventKind.Cleared)
        {
            if (_trees.TryGetValue(e.Tenant, out var cleared))
                cleared.ClearWorker(e.Worker, e.Tier);
            Counted(0);
            return null;
        }
        if (e.Kind is not (IndexEventKind.Stored or IndexEventKind.Removed))
            return RejectReason.Kind;
        if (e.Tier is not { } t)
            return RejectReason.Tier;
        if (e.Hashes.Length == 0 || e.Hashes.Length % BlockHash.Size != 0)
            return RejectReason.HashLength;
        var hashes = Decode(e.Hashes.Span);
        if (e.Kind == IndexEventKind.Removed)
        {
            if (_trees.TryGetValue(e.Tenant, out var tree))
                tree.ApplyRemoved(e.Worker, hashes, t);
            else
                Interlocked.Add(ref _removedNotHeldNoTenant, hashes.Length);
            Counted(hashes.Length);
            return null;
        }

        BlockHash? parent = null;
        if (e.Parent.Length == BlockHash.Size)
            parent = BlockHash.FromBytes(e.Parent.Span);
        else if (e.Parent.Length != 0)
            return RejectReason.ParentLength;
        if (!_trees.TryGetValue(e.Tenant, out var target))
        {
            if (parent is not null)
                return RejectReason.UnknownParent;
            _trees[e.Tenant] = target = new RadixTree(_options.InitialBlocksPerTenant);
        }
        switch (target.ApplyStored(e.Worker, parent, hashes, t))
        {
            case ApplyStatus.Applied:
                Counted(hashes.Length);
                return null;
            case ApplyStatus.UnknownParent:
                return RejectReason.UnknownParent;
            case ApplyStatus.ParentMismatch:
                return RejectReason.ParentMismatch;
            case ApplyStatus.ZeroHash:
                return RejectReason.ZeroHash;
            default:
                return RejectReason.Tier;
        }
    }

    private void Counted(int blocks)
    {
        Interlocked.Increment(ref _appliedEvents);
        Interlocked.Add(ref _appliedBlocks, blocks);
    }

    // The wire's big-endian digests to BlockHash, into a scratch array the writer reuses.
    private ReadOnlySpan<BlockHash> Decode(ReadOnlySpan<byte> packed)
    {
        int n = packed.Length / BlockHash.Size;
        if (_hashScratch.Length < n)
            _hashScratch = new BlockHash[Math.Max(n, 2 * _hashScratch.Length)];
        var span = _hashScratch.AsSpan(0, n);
        for (int i = 0; i < n; i++)
            span[i] = BlockHash.FromBytes(packed.Slice(i * BlockHash.Size, BlockHash.Size));
        return span;
    }

    private void RemoveNodeNow(string node)
    {
        try
        {
            int[] workers = WorkersOfNode(node);
            foreach (var tree in _trees.Values)
            {
                foreach (int w in workers)
                    tree.ClearWorker(w, null);
            }
        }
#pragma warning disable CA1031 // see Apply
        catch (Exception ex)
#pragma warning restore CA1031
        {
            Interlocked.Increment(ref _rejected[(int)RejectReason.Exception]);
            Volatile.Write(ref _lastError, $"removing node '{node}': {ex.GetType().Name}: {ex.Message}");
        }
    }

    private void FailPendingFlushes()
    {
        foreach (var flush in _batchFlushes)
            flush.TrySetResult();
        while (_queue.Reader.TryRead(out var item))
            item.Flush?.TrySetException(new ObjectDisposedException(nameof(RadixIndex), "the index was disposed before this flush point was reached"));
    }
}
