namespace KvFabric.Transfer;

/// <summary>A byte range in some address space, for the registry's and the remote view's lookups.</summary>
internal interface IAddressRange
{
    ulong Start { get; }
    ulong End { get; }
}

internal static class AddressRanges
{
    /// <summary>
    /// The index of the range (in an array sorted by start, without overlaps) that contains all of
    /// [address, address+length), or -1. O(log n), no allocation.
    /// </summary>
    public static int Find<T>(T[] sorted, ulong address, ulong length) where T : IAddressRange
    {
        int lo = 0, hi = sorted.Length - 1;
        while (lo <= hi)
        {
            int mid = (lo + hi) >>> 1;
            var r = sorted[mid];
            if (address < r.Start)
                hi = mid - 1;
            else if (address >= r.End)
                lo = mid + 1;
            else
                return length <= r.End - address ? mid : -1;
        }
        return -1;
    }
}
