namespace KvFabric.Tiers.Policies;

// An admission filter for a tier where writes are expensive (the SSD tier: flash wear and write bandwidth): a block
// enters the full tier only if it was already seen there before (refused or evicted) within the sketch's memory, and
// the inner policy also admits it. Everything else is the inner policy's. Blocks seen once (most blocks of a
// conversation trace are never reused) then never cost a write.
//
// The contract asks ShouldAdmit only when the tier is full, so an empty tier still fills without the filter.
public sealed class SeenTwiceAdmission : IEvictionPolicy
{
    private readonly IEvictionPolicy _inner;
    private readonly FrequencySketch _seen;

    public SeenTwiceAdmission(IEvictionPolicy inner, int expectedBlocks)
    {
        ArgumentNullException.ThrowIfNull(inner);
        ArgumentOutOfRangeException.ThrowIfLessThan(expectedBlocks, 1);
        _inner = inner;
        // Remembers about ten tier-fulls of sightings, like TinyLFU's door.
        _seen = new FrequencySketch(10L * expectedBlocks);
    }

    public string Name => _inner.Name + "+seen-twice";

    public IEvictionPolicy Inner => _inner;

    // Blocks refused because they had not been seen before (for reports).
    public long RefusedFirstSightings { get; private set; }

    public bool ShouldAdmit(in PolicyBlockInfo info)
    {
        bool seenBefore = _seen.Increment(info.Key) >= 2;
        // The inner policy is always asked, so that its own history counts this sighting too.
        bool inner = _inner.ShouldAdmit(info);
        if (!seenBefore)
            RefusedFirstSightings++;
        return seenBefore && inner;
    }

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        _seen.Increment(info.Key);
        _inner.OnAdmit(handle, info);
    }

    public void OnSighting(in PolicyBlockInfo info) => _inner.OnSighting(info);

    public void OnAccess(int handle) => _inner.OnAccess(handle);

    public void OnRemove(int handle) => _inner.OnRemove(handle);

    public void SetEvictable(int handle, bool evictable) => _inner.SetEvictable(handle, evictable);

    public bool TryPickVictim(out int handle) => _inner.TryPickVictim(out handle);
}
