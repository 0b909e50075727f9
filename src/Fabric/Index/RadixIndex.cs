using System.Threading.Channels;
using KvFabric.Blocks;

namespace KvFabric.Index;

public sealed class RadixIndexOptions
{
    // Events waiting for the writer; producers wait (EnqueueAsync) or are refused (TryEnqueue) beyond it.
    public int QueueCapacity { get; init; } = 4096;

    // The writer applies queued events while holding the write lock for at most about this long, then lets readers in.
    public TimeSpan MaxWriteHold { get; init; } = TimeSpan.FromMilliseconds(0.5);

    // Pre-sizes each tenant's table; growth rehashes under the write lock (~0.1 s per million blocks), so size for the
    // expected steady state when Match latency matters from the start.
    public long InitialBlocksPerTenant { get; init; } = 1024;

    // The longest a reader or the writer waits for the lock before giving up with a TimeoutException (readers) or
    // retrying (the writer).
    public TimeSpan LockTimeout { get; init; } = TimeSpan.FromSeconds(10);
}

// The thread-safe, multi-tenant index: one writer thread owns every tenant's RadixTree and applies events from a bounded
// queue in short batches under a write lock; Match and Dump run on any thread under the read lock.
public sealed partial class RadixIndex : IDisposable
{
    private readonly RadixIndexOptions _options;
    private readonly Channel<WorkItem> _queue;
    private readonly ReaderWriterLockSlim _lock = new(LockRecursionPolicy.NoRecursion);
    private readonly Dictionary<uint, RadixTree> _trees = [];
    private readonly CancellationTokenSource _stop = new();
    private readonly Thread _writer;
    private int _disposed;

    public RadixIndex(RadixIndexOptions? options = null)
    {
        _options = options ?? new RadixIndexOptions();
        if (_options.QueueCapacity <= 0)
            throw new ArgumentOutOfRangeException(nameof(options), _options.QueueCapacity, "QueueCapacity must be positive");
        if (_options.MaxWriteHold <= TimeSpan.Zero || _options.LockTimeout <= TimeSpan.Zero)
            throw new ArgumentOutOfRangeException(nameof(options), "MaxWriteHold and LockTimeout must be positive");
        _queue = Channel.CreateBounded<WorkItem>(new BoundedChannelOptions(_options.QueueCapacity)
        {
            SingleReader = true,
            FullMode = BoundedChannelFullMode.Wait,
        });
        _writer = new Thread(WriterLoop) { IsBackground = true, Name = "kvfabric-index-writer" };
        _writer.Start();
    }

    public async ValueTask EnqueueAsync(IndexEvent e, CancellationToken cancellationToken = default)
    {
        try
        {
            await _queue.Writer.WriteAsync(new WorkItem(e, null, null), cancellationToken).ConfigureAwait(false);
        }
        catch (ChannelClosedException ex)
        {
            throw new ObjectDisposedException($"{nameof(RadixIndex)} is disposed; events can no longer be enqueued", ex);
        }
    }

    // False when the queue is full (back-pressure) or the index is disposed.
    public bool TryEnqueue(IndexEvent e) => _queue.Writer.TryWrite(new WorkItem(e, null, null));

    // Clears every worker of the node in every tenant, in order with the events enqueued before it.
    public async ValueTask RemoveNodeAsync(string node, CancellationToken cancellationToken = default)
    {
        ArgumentException.ThrowIfNullOrEmpty(node);
        try
        {
            await _queue.Writer.WriteAsync(new WorkItem(default, node, null), cancellationToken).ConfigureAwait(false);
        }
        catch (ChannelClosedException ex)
        {
            throw new ObjectDisposedException($"{nameof(RadixIndex)} is disposed; cannot remove node '{node}'", ex);
        }
    }

    // Completes once everything enqueued before the call is applied. Pass a token with a deadline.
    public async Task FlushAsync(CancellationToken cancellationToken = default)
    {
        var done = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        try
        {
            await _queue.Writer.WriteAsync(new WorkItem(default, null, done), cancellationToken).ConfigureAwait(false);
        }
        catch (ChannelClosedException ex)
        {
            throw new ObjectDisposedException($"{nameof(RadixIndex)} is disposed; nothing more will be applied", ex);
        }
        await done.Task.WaitAsync(cancellationToken).ConfigureAwait(false);
    }

    // See RadixTree.Match; an unknown tenant matches nothing.
    public int Match(uint tenant, ReadOnlySpan<BlockHash> chain, List<MatchResult> output)
    {
        ArgumentNullException.ThrowIfNull(output);
        EnterRead();
        try
        {
            if (_trees.TryGetValue(tenant, out var tree))
                return tree.Match(chain, output);
            output.Clear();
            return 0;
        }
        finally
        {
            _lock.ExitReadLock();
        }
    }

    // See RadixTree.Dump. Holds the read lock for the whole walk (the writer waits): a snapshot, not a periodic call.
    public void Dump(uint tenant, List<StoredRun> output, int? worker = null)
    {
        ArgumentNullException.ThrowIfNull(output);
        EnterRead();
        try
        {
            if (_trees.TryGetValue(tenant, out var tree))
                tree.Dump(output, worker);
        }
        finally
        {
            _lock.ExitReadLock();
        }
    }

    public IndexCounters Counters
    {
        get
        {
            var rejected = new Dictionary<string, long>();
            for (int r = 0; r < RejectReasons.Count; r++)
                rejected[RejectReasons.Name((RejectReason)r)] = Interlocked.Read(ref _rejected[r]);
            long blocks = 0, locations = 0, bytes = 0, notHeld = Interlocked.Read(ref _removedNotHeldNoTenant);
            int tenants;
            EnterRead();
            try
            {
                tenants = _trees.Count;
                foreach (var tree in _trees.Values)
                {
                    blocks += tree.Blocks;
                    locations += tree.Locations;
                    bytes += tree.BytesAllocated;
                    notHeld += tree.RemovedNotHeld;
                }
            }
            finally
            {
                _lock.ExitReadLock();
            }
            return new IndexCounters(Interlocked.Read(ref _appliedEvents), Interlocked.Read(ref _appliedBlocks), notHeld, rejected,
                _queue.Reader.Count, tenants, blocks, locations, bytes);
        }
    }

    // The message of the last unexpected exception the writer caught (counted as "exception"), for diagnosis.
    public string? LastWriterError => Volatile.Read(ref _lastError);

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        _queue.Writer.TryComplete();
        _stop.Cancel();
        bool stopped = _writer.Join(_options.LockTimeout);
        FailPendingFlushes();
        if (stopped)
        {
            // The writer is gone and no reader can be inside once we hold the write lock.
            if (_lock.TryEnterWriteLock(_options.LockTimeout))
            {
                DiscardGrowths();
                foreach (var tree in _trees.Values)
                    tree.Dispose();
                _trees.Clear();
                _lock.ExitWriteLock();
            }
        }
        _stop.Dispose();
    }

    private void EnterRead()
    {
        ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
        if (!_lock.TryEnterReadLock(_options.LockTimeout))
            throw new TimeoutException($"the index's read lock was not granted within {_options.LockTimeout}; the writer is stuck or the machine is overloaded");
    }

    private readonly record struct WorkItem(IndexEvent Event, string? RemoveNode, TaskCompletionSource? Flush);
}
