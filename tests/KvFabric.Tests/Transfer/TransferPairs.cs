using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Transfer.Diagnostics;

namespace KvFabric.Tests.Transfer;

internal static class TransferPairs
{
    /// <summary>Remote block i goes to local slot (n-1-i): a block landing at the wrong offset cannot go unnoticed.</summary>
    public static (MemoryDescriptor[] Local, MemoryDescriptor[] Remote) Reversed(HostBlockPool pool, TransferPeerProcess peer, int n, int blockBytes)
    {
        var local = new MemoryDescriptor[n];
        var remote = new MemoryDescriptor[n];
        for (int i = 0; i < n; i++)
        {
            local[i] = MemoryDescriptor.Of(pool.SlotAt(n - 1 - i).Address, blockBytes);
            remote[i] = peer.Remote((long)i * blockBytes, blockBytes);
        }

        return (local, remote);
    }
}
