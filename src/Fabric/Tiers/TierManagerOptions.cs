namespace KvFabric.Tiers;

public enum WritePolicy : byte
{
    // A put lands in the fastest tier that takes it; slower tiers see the block only when it is demoted.
    WriteBack = 0,
    // A put also writes the block to the slowest (durable) tier at once, so a crash loses nothing that was acknowledged
    // and a later eviction from the faster tiers costs no write.
    WriteThrough = 1,
}

// Consulted every time a block would enter a tier (unlike IEvictionPolicy.ShouldAdmit, which is asked only when the
// tier is full). Refusal means the block bypasses the tier; at the last tier it is not stored.
public interface ITierAdmissionFilter
{
    bool Admit(in PolicyBlockInfo info);
}

public sealed record TierOptions
{
    public required IBlockStore Store { get; init; }
    public required IEvictionPolicy Policy { get; init; }
    // Bytes this tier may hold; at most the store's capacity. Null: the store's capacity.
    public long? CapacityBytes { get; init; }
    public ITierAdmissionFilter? Admission { get; init; }
    // Initial estimates for the load-versus-recompute gate; reads refine the bandwidth (see docs/tiers.md).
    public double ReadBandwidthBytesPerSecond { get; init; } = 10e9;
    public double ReadLatencySeconds { get; init; } = 10e-6;
}

public sealed record TierManagerOptions
{
    // Fastest first: any subset of Gpu, Host, Ssd in that order.
    public required IReadOnlyList<TierOptions> Tiers { get; init; }
    public WritePolicy WritePolicy { get; init; } = WritePolicy.WriteBack;
    // Hits in a slower tier queue a background copy to a faster one; beyond this many queued, promotions are skipped.
    public int PromotionQueueCapacity { get; init; } = 1024;
    public bool PromoteOnHit { get; init; } = true;
    // Recompute cost of the block at depth d: RecomputeSecondsPerBlock + d * RecomputeSecondsPerBlockPerDepth (the
    // second term is attention over the d blocks before it). Null RecomputeSecondsPerBlock: the gate is off.
    public double? RecomputeSecondsPerBlock { get; init; }
    public double RecomputeSecondsPerBlockPerDepth { get; init; }
    // Weight of a new sample in the exponentially weighted bandwidth estimate.
    public double BandwidthSmoothing { get; init; } = 0.2;
    public IKvEventSink? Events { get; init; }
    public TimeProvider Time { get; init; } = TimeProvider.System;
    // Dispose the stores with the manager.
    public bool OwnsStores { get; init; } = true;
    // How long disposal waits for a running move or promotion (a device that stopped answering); then the stores stay
    // open under it.
    public TimeSpan DisposeMoveTimeout { get; init; } = TimeSpan.FromSeconds(60);
}

// A store that keeps blocks of exactly one size (fixed slots); the tier manager refuses other sizes up front.
public interface IFixedSizeBlockStore
{
    int BlockBytes { get; }
}

// A store that can hand out a resident block's bytes in place (no copy): valid while the tier manager keeps the block in
// use (TierManager.TryOpenInPlace), since only then can the slot not be evicted, moved out or reused.
public interface IInPlaceBlockStore
{
    bool TryGetBytes(BlockKey key, out ReadOnlyMemory<byte> bytes);
}
