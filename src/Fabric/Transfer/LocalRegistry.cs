using System.Security.Cryptography;
using KvFabric.Memory;

namespace KvFabric.Transfer;

/// <summary>The regions this agent registered: by id for the target path, by address for descriptor validation.</summary>
internal sealed class LocalRegistry
{
    private readonly Lock _lock = new();
    private volatile RegisteredRegion[] _byAddress = [];
    private volatile Dictionary<uint, RegisteredRegion> _byId = new();
    private uint _nextId = 1;

    public RegisteredRegion[] All => _byAddress;

    public RegisteredRegion Add(INativeMemory? memory, MemoryKind kind, ulong address, ulong length, int deviceId, string? mappedPath)
    {
        if (length == 0)
            throw new TransferException("cannot register a zero-length region");
        if (address == 0 || address + length < address)
            throw new TransferException($"cannot register [0x{address:x}, +{length}): not a valid address range");
        lock (_lock)
        {
            foreach (var r in _byAddress)
            {
                if (address < r.Address + r.Length && r.Address < address + length)
                    throw new TransferException($"[0x{address:x}, +{length}) overlaps already registered {r}; deregister it first or register the union once");
            }
            var key = new RegionKey(BitConverter.ToUInt64(RandomNumberGenerator.GetBytes(8)));
            var region = new RegisteredRegion(_nextId++, memory, kind, address, length, deviceId, key, mappedPath);
            _byAddress = [.. _byAddress.Append(region).OrderBy(r => r.Address)];
            _byId = new Dictionary<uint, RegisteredRegion>(_byId) { [region.Id] = region };
            return region;
        }
    }

    /// <summary>Whether this very region (not just its id) is registered here, closing or not.</summary>
    public bool Contains(RegisteredRegion region) => _byId.GetValueOrDefault(region.Id) == region;

    public void Remove(RegisteredRegion region)
    {
        lock (_lock)
        {
            if (!_byId.TryGetValue(region.Id, out var found) || found != region)
                throw new TransferException($"{region} is not registered with this agent");
            _byAddress = [.. _byAddress.Where(r => r.Id != region.Id)];
            var copy = new Dictionary<uint, RegisteredRegion>(_byId);
            copy.Remove(region.Id);
            _byId = copy;
        }
    }

    public RegisteredRegion? ById(uint id) => _byId.GetValueOrDefault(id);

    public RegisteredRegion? Find(ulong address, ulong length)
    {
        var arr = _byAddress;
        int i = AddressRanges.Find(arr, address, length);
        return i < 0 ? null : arr[i];
    }
}
