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

    // Per-backend peer state (connections, mappings), owned by the backends.
    internal object? TcpState;
    internal object? ShmState;

    /// <summary>The index (in Metadata.Regions) of the region containing [address, address+length), or -1.</summary>
    internal int FindRegion(ulong address, ulong length)
    {
        int lo = 0, hi = _byAddress.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            var r = _byAddress[mid];
            if (address < r.Address)
                hi = mid - 1;
            else if (address >= r.End)
                lo = mid + 1;
            else
                return length <= r.End - address ? _indexOf[mid] : -1;
        }
        return -1;
    }

    public override string ToString() => $"{Metadata.Name} ({Metadata.AgentId}) at {Metadata.TcpHost}:{Metadata.TcpPort}";
}
