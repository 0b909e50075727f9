namespace KvFabric.Transfer;

/// <summary>A peer whose metadata was loaded: the regions it exported to us, and how we reach it.</summary>
public sealed class RemoteAgent
{
    private readonly RemoteRegionInfo[] _byAddress;
    private readonly int[] _indexOf; // position in Metadata.Regions of each _byAddress entry

    internal RemoteAgent(AgentMetadata metadata, bool sameHost)
    {
        Metadata = metadata;
        SameHost = sameHost;
        var order = Enumerable.Range(0, metadata.Regions.Count).OrderBy(i => metadata.Regions[i].Address).ToArray();
        _byAddress = order.Select(i => metadata.Regions[i]).ToArray();
        _indexOf = order;
        for (int i = 1; i < _byAddress.Length; i++)
        {
            if (_byAddress[i].Address < _byAddress[i - 1].End)
                throw new TransferException($"agent '{metadata.Name}' exported overlapping regions {_byAddress[i - 1].Id} and {_byAddress[i].Id}: its metadata is corrupt");
        }
    }

    public AgentMetadata Metadata { get; }
    public string Name => Metadata.Name;
    public Guid AgentId => Metadata.AgentId;
    /// <summary>Same boot of the same machine: shared memory may reach its mappable regions.</summary>
    public bool SameHost { get; }
    internal volatile bool Unloaded;
    private int _inflight;
    // Completed once the remote is unloaded and no post is in it; created before Unloaded is set (see DrainAsync).
    private TaskCompletionSource? _drained;

    /// <summary>Counts a post in; false when the remote is being unloaded (its mappings and connections are going).</summary>
    internal bool TryEnterPost()
    {
        Interlocked.Increment(ref _inflight);
        if (!Unloaded)
            return true;
        ExitPost(); // may be the count a draining DrainAsync waits on
        return false;
    }

    internal void ExitPost()
    {
        // A full fence: either DrainAsync's read of _inflight sees this decrement, or we see Unloaded (and _drained).
        if (Interlocked.Decrement(ref _inflight) == 0 && Unloaded)
            Volatile.Read(ref _drained)?.TrySetResult();
    }

    /// <summary>Marks the remote unloaded and waits (bounded) until no post is using its connections or mappings.</summary>
    internal async Task DrainAsync(TimeSpan timeout)
    {
        Interlocked.CompareExchange(ref _drained, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously), null);
        var drained = _drained!;
        Unloaded = true;
        Interlocked.MemoryBarrier();
        if (Volatile.Read(ref _inflight) == 0)
            drained.TrySetResult();
        await drained.Task.WaitAsync(timeout).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing); // bounded: the caller goes on either way
    }

    // Per-backend peer state (connections, mappings), owned by the backends.
    internal object? TcpState;
    internal object? ShmState;
    internal object? UcxState;

    /// <summary>The UCX transports ("tcp/lo", "posix/memory", "rc_mlx5/mlx5_0:1", ...) of the endpoint to this peer, once one exists.</summary>
    public IReadOnlyList<string> UcxTransports { get; internal set; } = [];

    /// <summary>The index (in Metadata.Regions) of the region containing [address, address+length), or -1.</summary>
    internal int FindRegion(ulong address, ulong length)
    {
        int i = AddressRanges.Find(_byAddress, address, length);
        return i < 0 ? -1 : _indexOf[i];
    }

    public override string ToString() => $"{Metadata.Name} ({Metadata.AgentId}) at {Metadata.TcpHost}:{Metadata.TcpPort}";
}
