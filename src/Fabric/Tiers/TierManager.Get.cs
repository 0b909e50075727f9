using KvFabric.Blocks;

namespace KvFabric.Tiers;

public sealed partial class TierManager
{
    // Reads the cached prefix of chain into destinations (one per block, each at least the block's length), each block
    // from the fastest tier holding it. Returns how many leading blocks were read; the rest count as misses. A hit in a
    // slower tier queues a promotion. A block whose bytes fail their checksum is dropped and the read falls back to
    // another tier holding it, or ends there.
    public async ValueTask<int> GetAsync(uint tenant, ReadOnlyMemory<BlockHash> chain, IReadOnlyList<Memory<byte>> destinations, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(destinations);
        if (destinations.Count < chain.Length)
            throw new ArgumentException($"{destinations.Count} destination buffers for a chain of {chain.Length} blocks; pass one per block", nameof(destinations));
        int read = 0, prev = None;
        while (read < chain.Length)
        {
            var key = new BlockKey(tenant, chain.Span[read]);
            var destination = destinations[read];
            int b, t, length;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                b = FindInChain(key, prev);
                if (b == None || _held[b] == 0)
                    break;
                if (destination.Length < _length[b])
                    throw new ArgumentException($"destination {read} holds {destination.Length} bytes but block {key} has {_length[b]}", nameof(destinations));
                t = Fastest(b);
                length = _length[b];
                Tick();
                AddUse(b);
                _activeReads++;
            }
            bool ok = false, corrupt = false;
            try
            {
                ok = await ReadTimedAsync(_tiers[t], key, destination[..length], cancellationToken).ConfigureAwait(false);
            }
            catch (BlockCorruptException)
            {
                corrupt = true;
            }
            finally
            {
                lock (_lock)
                {
                    if (ok && Holds(b, t))
                    {
                        var tier = _tiers[t];
                        tier.Hits++;
                        ReportSighting(InfoOf(b));
                        tier.Policy.OnAccess(_handle[t][b]);
                        if (t > 0)
                            QueuePromotion(key);
                    }
                    Tick();
                    DropUse(b);
                    if (--_activeReads == 0 && _readsDrained is { } drained)
                        drained.TrySetResult();
                }
            }
            // A store may also drop a block on its own (the SSD store's compaction drops a record that fails its checksum,
            // as a read would): a read that finds it absent repairs the metadata as after a corrupt read. A read that
            // failed (an I/O error) finds the block still in the store and leaves it.
            if (corrupt || !ok && !Volatile.Read(ref _disposed) && !_tiers[t].Store.Contains(key))
            {
                // The repair waits for the mover, which a move stuck on a device may hold: the read waits only as long as
                // its caller lets it, and the repair then goes on without it.
                await DropCorruptGatedAsync(b, key, t).WaitAsync(cancellationToken).ConfigureAwait(false);
                continue; // retry this block from another tier, if one still holds it
            }
            if (!ok)
                break;
            prev = b;
            read++;
        }
        lock (_lock)
            _misses += chain.Length - read;
        return read;
    }

    // Opens a block to be read in place (no copy) from its fastest tier, when that tier's store can expose its bytes
    // (IInPlaceBlockStore): counts the hit and touches the policy as GetAsync does, queues a promotion for a hit below the
    // top tier, and keeps the block in use (not evicted, moved out or deleted) until the scope is disposed. Null when the
    // block is absent or its fastest tier cannot serve in place (read it with GetAsync then).
    public BlockUseScope? TryOpenInPlace(uint tenant, BlockHash hash, out ReadOnlyMemory<byte> bytes, out TierKind tier)
    {
        var key = new BlockKey(tenant, hash);
        bytes = default;
        tier = default;
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_disposed, this);
            if (!_index.TryGetValue(key, out int b) || _held[b] == 0)
                return null;
            int t = Fastest(b);
            var state = _tiers[t];
            if (state.Store is not IInPlaceBlockStore inPlace || !inPlace.TryGetBytes(key, out bytes))
                return null;
            Tick();
            AddUse(b);
            _activeReads++; // DisposeAsync waits for it: the bytes live in the store's memory
            state.Hits++;
            ReportSighting(InfoOf(b));
            state.Policy.OnAccess(_handle[t][b]);
            if (t > 0)
                QueuePromotion(key);
            tier = state.Kind;
            return new BlockUseScope(this, b);
        }
    }

    // Cancelled only by the manager's shutdown: the store has already dropped the bytes, so the metadata must follow (a
    // reader that gives up leaves this running). Until it has, a read of the block finds it absent and comes here again.
    private async Task DropCorruptGatedAsync(int b, BlockKey key, int t)
    {
        try
        {
            await _mover.WaitAsync(_stopping).ConfigureAwait(false);
        }
        catch (OperationCanceledException)
        {
            return; // shutting down: the metadata goes with the manager
        }
        try
        {
            lock (_lock)
            {
                // Disposed meanwhile (the stores may be closed), or the block moved or was dropped while we waited.
                if (_disposed || !_index.TryGetValue(key, out int now) || now != b || !Holds(b, t))
                    return;
            }
            // The store dropped the corrupt bytes when it threw; if it holds the key again, a delete and a put ran while we
            // waited (the table entry can be reused): that copy is fresh and stays. No store write runs under the gate.
            if (_tiers[t].Store.Contains(key))
                return;
            DropCorrupt(b, t);
        }
        finally
        {
            _mover.Release();
        }
    }

    // Under the mover gate. The store has already dropped the block from tier t. If no other tier holds it, its cached
    // descendants are unreachable now and are dropped too (those in use by a transfer stay until released).
    private void DropCorrupt(int b, int t)
    {
        lock (_lock)
        {
            Tick();
            RemoveResidency(b, t);
            _tiers[t].StoreErrors++;
            if (_held[b] == 0)
                DropSubtree(b, honorPins: false);
            FreeBlockIfUnused(b);
        }
        FlushRemovals();
    }

    private void QueuePromotion(BlockKey key)
    {
        if (_promotions is null)
            return;
        _pendingPromotions++;
        if (_promotions.Writer.TryWrite(key))
        {
            _promotionsQueued++;
        }
        else
        {
            _pendingPromotions--;
            _promotionsSkipped++;
        }
    }

    private async Task PromoteLoopAsync()
    {
        var reader = _promotions!.Reader;
        var ct = _shutdown.Token;
        while (await reader.WaitToReadAsync(ct).ConfigureAwait(false))
        {
            while (reader.TryRead(out var key))
            {
                await _mover.WaitAsync(ct).ConfigureAwait(false);
                try
                {
                    await PromoteAsync(key).ConfigureAwait(false);
                }
                catch (Exception e) when (e is not OperationCanceledException || !ct.IsCancellationRequested)
                {
                    // A promotion is an optimization: a failing one (a store's own cancellation included) must not stop
                    // the ones behind it; only the manager's shutdown ends the loop.
                    lock (_lock)
                        _promotionsFailed++;
                }
                finally
                {
                    _mover.Release();
                    lock (_lock)
                    {
                        if (--_pendingPromotions == 0 && _idle is { } idle)
                        {
                            _idle = null;
                            idle.SetResult();
                        }
                    }
                }
            }
        }
    }

    // Copies the block into the fastest tier it may occupy (its parent's fastest tier; the first block of a chain may go
    // to the top), keeping the slower copy: eviction of the promoted copy then costs no write.
    private async ValueTask PromoteAsync(BlockKey key)
    {
        int b, parent, from, target;
        lock (_lock)
        {
            if (!_index.TryGetValue(key, out b) || _held[b] == 0)
                return;
            parent = _parent[b];
            from = Fastest(b);
            target = parent == None ? 0 : Math.Max(0, Fastest(parent));
            if (target >= from)
                return;
            Tick();
            AddUse(b);
            if (parent != None)
                AddUse(parent);
        }
        try
        {
            PolicyBlockInfo info;
            BlockMeta meta;
            lock (_lock)
            {
                info = InfoOf(b);
                meta = MetaOf(b);
            }
            for (int u = target; u < from; u++)
            {
                if (await ReserveAsync(u, info, forced: false).ConfigureAwait(false) != Room.Reserved)
                    continue;
                var copied = Copy.Failed;
                try
                {
                    copied = await CopyAsync(info, meta, from, u).ConfigureAwait(false);
                }
                finally
                {
                    lock (_lock)
                    {
                        _tiers[u].Reserved -= info.Bytes;
                        if (copied == Copy.Done)
                        {
                            AddResidency(b, u);
                            _tiers[u].PromotionsIn++;
                            _tiers[u].BytesMovedIn += info.Bytes;
                        }
                    }
                }
                if (copied == Copy.Done)
                    return;
                if (copied == Copy.SourceCorrupt)
                {
                    DropCorrupt(b, from);
                    return;
                }
            }
        }
        finally
        {
            lock (_lock)
            {
                Tick();
                if (parent != None)
                    DropUse(parent);
                DropUse(b);
            }
        }
    }
}
