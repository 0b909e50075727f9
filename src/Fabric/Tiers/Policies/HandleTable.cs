namespace KvFabric.Tiers.Policies;

// Growth and checks shared by the policies' per-handle arrays. The tier manager hands out dense handles starting at 0,
// so an array sized to the largest handle seen is as small as the tier; it grows by doubling, so after warm-up (the
// tier filled once) no operation allocates.
internal static class HandleTable
{
    public static int InitialSize(int capacityHint)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(capacityHint);
        return Math.Max(16, capacityHint);
    }

    public static int GrownSize(int current, int handle)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(handle);
        long size = Math.Max(16, (long)current);
        while (size <= handle)
            size *= 2;
        return (int)Math.Min(size, Array.MaxLength);
    }

    public static void Grow<T>(ref T[] array, int size, T fill)
    {
        int old = array.Length;
        Array.Resize(ref array, size);
        if (!EqualityComparer<T>.Default.Equals(fill, default!))
            array.AsSpan(old).Fill(fill);
    }

    public static InvalidOperationException NotResident(string policy, int handle) =>
        new($"{policy}: handle {handle} is not resident in this tier (admit it with OnAdmit first; a removed handle must be admitted again before use).");

    public static InvalidOperationException AlreadyResident(string policy, int handle) =>
        new($"{policy}: handle {handle} is already resident; OnRemove it before admitting another block under the same handle.");
}
