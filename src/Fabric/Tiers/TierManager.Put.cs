using KvFabric.Blocks;

namespace KvFabric.Tiers;

public sealed partial class TierManager
{
    // Stores a chain segment: blocks[0]'s parent is `parent` (null: blocks[0] starts a chain), each later block's parent
    // is the one before it. Blocks already cached are only touched. Each new block lands in the fastest tier that takes
    // it, but never above its parent's fastest tier; with WritePolicy.WriteThrough it is also written to the slowest tier.
    public ValueTask<PutResult> PutAsync(uint tenant, BlockHash? parent, IReadOnlyList<BlockPut> blocks, CancellationToken cancellationToken = default) =>
        PutAsync(tenant, parent, blocks, null, cancellationToken);

    // As above; storedByThisCall[i] is set when blocks[i] was newly stored by this call (not already present).
    public async ValueTask<PutResult> PutAsync(uint tenant, BlockHash? parent, IReadOnlyList<BlockPut> blocks, bool[]? storedByThisCall,
        CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(blocks);
        ValidateBlocks(blocks);
        if (storedByThisCall is not null && storedByThisCall.Length < blocks.Count)
            throw new ArgumentException($"storedByThisCall holds {storedByThisCall.Length} entries for {blocks.Count} blocks; pass one per block", nameof(storedByThisCall));
        await _mover.WaitAsync(cancellationToken).ConfigureAwait(false);
        int held = None;
        try
        {
            int depth = 0;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                Tick();
                if (parent is { } p)
                {
                    if (!_index.TryGetValue(new BlockKey(tenant, p), out held) || _held[held] == 0)
                    {
                        held = None;
                        return new PutResult(PutStatus.ParentMissing, 0, 0, blocks.Count,
                            $"parent block {tenant}:{p} is not cached (evicted or never stored); put the chain from its first uncached block");
                    }
                    depth = _depth[held] + 1;
                    AddUse(held); // the parent must not move while its child is placed
                }
            }
            int stored = 0, present = 0;
            for (int i = 0; i < blocks.Count; i++)
            {
                cancellationToken.ThrowIfCancellationRequested();
                var key = new BlockKey(tenant, blocks[i].Hash);
                int start;
                BlockMeta meta;
                bool stale = false;
                lock (_lock)
                {
                    ReportSighting(new PolicyBlockInfo(key, depth, blocks[i].Bytes.Length));
                    if (_index.TryGetValue(key, out int b) && _held[b] != 0)
                    {
                        var tier = _tiers[Fastest(b)];
                        tier.Policy.OnAccess(_handle[tier.Index][b]);
                        present++;
                        AddUse(b);
                        if (held != None)
                            DropUse(held);
                        held = b;
                        depth = _depth[b] + 1;
                        continue;
                    }
                    if (_index.TryGetValue(key, out b))
                    {
                        // The entry of a block whose last copy was dropped as corrupt while a child or a reader still
                        // held it. Finish dropping its descendants (DropCorrupt's rule); the entry itself then goes, or,
                        // still in use by a reader and childless, is reused by PlaceNewAsync.
                        DropSubtree(b, honorPins: false);
                        stale = _index.TryGetValue(key, out b) && (_firstChild[b] != None || _parent[b] != held);
                    }
                    start = held == None ? 0 : Fastest(held);
                    meta = new BlockMeta(held == None ? default : _key[held].Hash, depth, blocks[i].Bytes.Length);
                }
                FlushRemovals(); // before any store write of this key
                if (stale)
                {
                    return new PutResult(PutStatus.StoreFailed, stored, present, blocks.Count - i,
                        $"block {key} failed its checksum and was dropped, but a transfer still holds it or a block below it; retry the put once that transfer ends");
                }
                (int placed, var status, string? detail) = await PlaceNewAsync(key, held, start, meta, blocks[i].Bytes).ConfigureAwait(false);
                if (placed == None)
                {
                    if (status == PutStatus.Refused)
                        OfferRest(tenant, blocks, i + 1, depth + 1, start);
                    return new PutResult(status, stored, present, blocks.Count - i, detail);
                }
                held = placed; // PlaceNewAsync moved the in-use mark from the parent to the new block
                depth++;
                stored++;
                if (storedByThisCall is not null)
                    storedByThisCall[i] = true;
            }
            return new PutResult(PutStatus.Stored, stored, present, 0, null);
        }
        finally
        {
            if (held != None)
            {
                lock (_lock)
                {
                    Tick();
                    DropUse(held);
                }
            }
            _mover.Release();
        }
    }

    // A chain refused at block i is not stored past it, but the policy still sees the rest of it (answers ignored): a
    // frequency-based policy must learn a whole chain's reuse from one request, not one block per request.
    private void OfferRest(uint tenant, IReadOnlyList<BlockPut> blocks, int from, int depth, int tier)
    {
        lock (_lock)
        {
            for (int j = from; j < blocks.Count; j++, depth++)
            {
                var info = new PolicyBlockInfo(new BlockKey(tenant, blocks[j].Hash), depth, blocks[j].Bytes.Length);
                ReportSighting(info);
                _tiers[tier].Policy.ShouldAdmit(info);
                // Admission filters below count sightings too (a seen-twice SSD filter must see the whole chain once).
                for (int t = tier; t < _n; t++)
                    _tiers[t].Admission?.Admit(info);
            }
        }
    }

    // Under _lock. Tells every tier's policy that a request used this block (IEvictionPolicy.OnSighting): puts and reads
    // are uses, moves between tiers are not, so a block demoted or promoted into a tier arrives with its history.
    private void ReportSighting(in PolicyBlockInfo info)
    {
        for (int t = 0; t < _n; t++)
            _tiers[t].Policy.OnSighting(info);
    }

    private void ValidateBlocks(IReadOnlyList<BlockPut> blocks)
    {
        for (int i = 0; i < blocks.Count; i++)
        {
            int length = blocks[i].Bytes.Length;
            if (length == 0)
                throw new ArgumentException($"block {i} ({blocks[i].Hash}) is empty; a block carries its KV bytes", nameof(blocks));
            foreach (var tier in _tiers)
            {
                if (tier.FixedBlockBytes != 0 && length != tier.FixedBlockBytes)
                    throw new ArgumentException($"block {i} ({blocks[i].Hash}) has {length} bytes but the {tier.Kind} tier stores blocks of exactly {tier.FixedBlockBytes}; check the KV layout (tokens per block, dtype) against the sidecar's", nameof(blocks));
                if (length > tier.Capacity)
                    throw new ArgumentException($"block {i} ({blocks[i].Hash}) has {length} bytes, more than the whole {tier.Kind} tier ({tier.Capacity})", nameof(blocks));
            }
        }
    }

    // Places a new block in the first tier from `start` down that takes it. On success the block is in use (held by the
    // put, so it cannot be evicted before its child is placed) and the parent's in-use mark is released, in the commit.
    private async ValueTask<(int Block, PutStatus Status, string? Detail)> PlaceNewAsync(
        BlockKey key, int parent, int start, BlockMeta meta, ReadOnlyMemory<byte> bytes)
    {
        int depth = meta.Depth;
        var info = new PolicyBlockInfo(key, depth, bytes.Length);
        var status = PutStatus.Refused;
        for (int t = start; t < _n; t++)
        {
            var room = await ReserveAsync(t, info, forced: false).ConfigureAwait(false);
            if (room != Room.Reserved)
            {
                if (room == Room.NoRoom && status != PutStatus.StoreFailed)
                    status = PutStatus.ResourceExhausted;
                continue;
            }
            bool written = false;
            int b = None;
            try
            {
                written = await WriteAsync(_tiers[t], key, meta, bytes).ConfigureAwait(false);
            }
            finally
            {
                lock (_lock)
                {
                    _tiers[t].Reserved -= bytes.Length;
                    if (written)
                    {
                        // A stale entry left by a corruption drop (childless, same parent: see PutAsync) is reused.
                        if (_index.TryGetValue(key, out b))
                            _length[b] = bytes.Length;
                        else
                            b = NewBlock(key, parent, depth, bytes.Length);
                        AddResidency(b, t);
                        AddUse(b);
                        if (parent != None)
                            DropUse(parent);
                    }
                }
            }
            if (!written)
            {
                status = PutStatus.StoreFailed; // the more actionable cause when tiers also lacked room
                continue;
            }
            if (_options.WritePolicy == WritePolicy.WriteThrough && t < _n - 1)
                await WriteThroughAsync(b, info, meta, bytes).ConfigureAwait(false);
            return (b, PutStatus.Stored, null);
        }
        string detail = status switch
        {
            PutStatus.ResourceExhausted => $"no tier from {_tiers[start].Kind} down could make room for block {key} ({bytes.Length} bytes): every resident block is pinned, in use by a transfer, or a parent of a cached block; unpin or release blocks, or add capacity",
            PutStatus.StoreFailed => $"no tier from {_tiers[start].Kind} down took block {key}: a store failed to write it (see the tiers' StoreErrors) and the others were full or refused it",
            _ => $"every tier from {_tiers[start].Kind} down refused block {key} by its admission policy",
        };
        return (None, status, detail);
    }

    // Best effort: a write-through copy that finds no room or fails leaves the block in its faster tier only. The block
    // is in use by the put meanwhile, so making room below cannot evict it.
    private async ValueTask WriteThroughAsync(int b, PolicyBlockInfo info, BlockMeta meta, ReadOnlyMemory<byte> bytes)
    {
        int last = _n - 1;
        if (await ReserveAsync(last, info, forced: false).ConfigureAwait(false) != Room.Reserved)
            return;
        bool written = false;
        try
        {
            written = await WriteAsync(_tiers[last], info.Key, meta, bytes).ConfigureAwait(false);
        }
        finally
        {
            lock (_lock)
            {
                _tiers[last].Reserved -= info.Bytes;
                if (written)
                    AddResidency(b, last);
            }
        }
    }
}
