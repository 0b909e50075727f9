namespace KvFabric.Tiers;

// What a policy is told about a block when it enters a tier. Depth is the block's position in its chain (0 = first
// block), so (Depth + 1) * tokens_per_block tokens of prefill are what recomputing it would cost at least.
public readonly record struct PolicyBlockInfo(BlockKey Key, int Depth, int Bytes);

// One instance per tier. The tier manager names resident blocks by dense handles it allocates and reuses, so a
// policy can keep its state in arrays and allocate nothing per operation.
public interface IEvictionPolicy
{
    string Name { get; }

    // Asked before a new block enters a full tier. False means the block bypasses this tier (it goes to the next tier
    // down, or is dropped at the last one) instead of displacing a resident block.
    bool ShouldAdmit(in PolicyBlockInfo info);

    // The block entered this tier (a put, or a move into it). It is not evictable until SetEvictable(handle, true).
    void OnAdmit(int handle, in PolicyBlockInfo info);

    // The block was used (a hit, or a put of a block already present) while in this tier.
    void OnAccess(int handle);

    // A request used this block (a put named it, or a read returned it), wherever it is: resident in this tier, in
    // another tier, or nowhere. A tier manager with several tiers reports every use to every tier's policy, before it
    // acts on the block, so that each policy's history counts the uses of blocks it does not hold yet (a block demoted
    // into this tier arrives with its history) and never counts a move between tiers (a demotion or a promotion) as a
    // use. A policy that is never told here counts uses from its other calls. Default: nothing.
    void OnSighting(in PolicyBlockInfo info)
    {
    }

    // The block left this tier (evicted, moved, deleted); the handle may be reused afterwards.
    void OnRemove(int handle);

    // Leaf-first and pins: only evictable blocks may be picked as victims.
    void SetEvictable(int handle, bool evictable);

    // The evictable block to evict next; false when none is evictable.
    bool TryPickVictim(out int handle);
}
