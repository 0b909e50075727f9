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
        int i = AddressRanges.Find(_byAddress, address, length);
        return i < 0 ? -1 : _indexOf[i];
    }

    public override string ToString() => $"{Metadata.Name} ({Metadata.AgentId}) at {Metadata.TcpHost}:{Metadata.TcpPort}";
}
