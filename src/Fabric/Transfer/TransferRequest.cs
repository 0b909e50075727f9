namespace KvFabric.Transfer;

/// <summary>One contiguous piece of a descriptor, sized to at most the agent's chunk size (the unit of striping).</summary>
internal readonly record struct Chunk(int Descriptor, nint Local, int RemoteRegion, ulong RemoteOffset, int Length);

/// <summary>
/// A validated, prepared transfer (NIXL's handle): descriptors are checked once at prepare; the request can then be
/// posted again and again. One post at a time; per-descriptor status is kept for the latest post.
/// </summary>
public sealed class TransferRequest
{
    private readonly int[] _chunkState;      // 0 pending, 1 settled
    private readonly int[] _descStatus;      // DescriptorStatus
    private readonly int[] _descRemaining;   // chunks of the descriptor not yet settled
    private readonly int[] _descChunks;
    private int _chunksRemaining;
    private int _posted;
    private string? _firstError;
    private TaskCompletionSource _allSettled = new(TaskCreationOptions.RunContinuationsAsynchronously);

    internal TransferRequest(TransferAgent agent, TransferOp op, RemoteAgent remote, Chunk[] chunks, int descriptorCount,
        ulong totalBytes, TransferOptions options, BackendKind backend, int streams)
    {
        Agent = agent;
        Op = op;
        Remote = remote;
        Chunks = chunks;
        DescriptorCount = descriptorCount;
        TotalBytes = totalBytes;
        Options = options;
        Backend = backend;
        Streams = streams;
        _chunkState = new int[chunks.Length];
        _descStatus = new int[descriptorCount];
        _descRemaining = new int[descriptorCount];
        _descChunks = new int[descriptorCount];
        foreach (var c in chunks)
            _descChunks[c.Descriptor]++;
    }

    internal TransferAgent Agent { get; }
    internal Chunk[] Chunks { get; }
    /// <summary>Chunks whose local side is device memory (staged through host slots each post), their regions and device addresses.</summary>
    internal (int[] Chunks, Cuda.DeviceRegion[] Regions, nint[] Addresses)? Device { get; set; }
    internal TransferOptions Options { get; }
    /// <summary>Unique per post, so late replies to an earlier post are recognised and ignored.</summary>
    internal ulong PostId { get; private set; }
    /// <summary>Backend-private state of the current post (the tasks that touch memory).</summary>
    internal object? BackendState { get; set; }
    /// <summary>
    /// Set when an abort could not confirm that the backend stopped touching the request's memory: the task that ends
    /// once it has. Until then the post keeps its regions, staging slots and the request itself (see PostAsync).
    /// </summary>
    internal Task? Quarantine { get; set; }

    public TransferOp Op { get; }
    public RemoteAgent Remote { get; }
    public int DescriptorCount { get; }
    public ulong TotalBytes { get; }
    public BackendKind Backend { get; }
    public int Streams { get; }
    public bool IsPosted => Volatile.Read(ref _posted) != 0;
    public TransferResult? LastResult { get; private set; }

    public DescriptorStatus GetStatus(int descriptor) => (DescriptorStatus)Volatile.Read(ref _descStatus[descriptor]);

    internal bool TryBeginPost(ulong postId)
    {
        if (Interlocked.Exchange(ref _posted, 1) != 0)
            return false;
        PostId = postId;
        Array.Clear(_chunkState);
        Array.Clear(_descStatus);
        Array.Copy(_descChunks, _descRemaining, _descChunks.Length);
        _chunksRemaining = Chunks.Length;
        _firstError = null;
        Quarantine = null;
        _allSettled = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        return true;
    }

    internal void EndPost(TransferResult result)
    {
        LastResult = result;
        BackendState = null;
        Volatile.Write(ref _posted, 0);
    }

    internal Task AllSettled => _allSettled.Task;
    internal bool IsSettled(int chunk) => Volatile.Read(ref _chunkState[chunk]) != 0;
    internal string? FirstError => Volatile.Read(ref _firstError);

    /// <summary>Settles a chunk once; later reports for it (a reply after a timeout) are ignored.</summary>
    internal void Settle(int chunk, DescriptorStatus status, string? error = null)
    {
        if (Interlocked.CompareExchange(ref _chunkState[chunk], 1, 0) != 0)
            return;
        int d = Chunks[chunk].Descriptor;
        if (status != DescriptorStatus.Done)
        {
            if (Interlocked.CompareExchange(ref _descStatus[d], (int)status, (int)DescriptorStatus.Pending) == (int)DescriptorStatus.Pending)
                Interlocked.CompareExchange(ref _firstError, $"descriptor {d}: {error ?? status.ToString()}", null);
        }
        if (Interlocked.Decrement(ref _descRemaining[d]) == 0)
            Interlocked.CompareExchange(ref _descStatus[d], (int)DescriptorStatus.Done, (int)DescriptorStatus.Pending);
        if (Interlocked.Decrement(ref _chunksRemaining) == 0)
            _allSettled.TrySetResult();
    }

    internal void SettleAllPending(DescriptorStatus status, string error)
    {
        for (int i = 0; i < Chunks.Length; i++)
            Settle(i, status, error);
    }

    /// <summary>Turns every descriptor that looked done into a failure (the peer never confirmed it).</summary>
    internal void FailDone(DescriptorStatus status, string error)
    {
        for (int d = 0; d < DescriptorCount; d++)
            Interlocked.CompareExchange(ref _descStatus[d], (int)status, (int)DescriptorStatus.Done);
        Interlocked.CompareExchange(ref _firstError, error, null);
    }

    internal bool AllDone()
    {
        for (int d = 0; d < DescriptorCount; d++)
        {
            if (GetStatus(d) != DescriptorStatus.Done)
                return false;
        }
        return true;
    }
}
