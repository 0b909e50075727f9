using System.Buffers;

namespace KvFabric.Tiers;

// Room-making and movement. Everything here runs under the mover gate (one move at a time), taking the metadata lock
// only for planning and committing; copies run outside it. Moves take no cancellation token: a move is finished or
// undone, never abandoned halfway; public operations honor cancellation between blocks.
public sealed partial class TierManager
{
    private enum Room : byte { Reserved, Refused, NoRoom }

    // Reserves bytes for a block about to enter tier t, evicting (demoting) victims as needed. Forced placements (a
    // parent that must stay at or above its children's tier) skip admission.
    private async ValueTask<Room> ReserveAsync(int t, PolicyBlockInfo info, bool forced)
    {
        var tier = _tiers[t];
        lock (_lock)
        {
            if (!forced && tier.Admission is { } filter && !filter.Admit(info))
            {
                tier.AdmissionRefusals++;
                return Room.Refused;
            }
            if (tier.Free >= info.Bytes)
            {
                tier.Reserved += info.Bytes;
                return Room.Reserved;
            }
            Tick();
            ExpireLeases();
            // Not even evicting every evictable block would make room: say so without touching anything.
            if (info.Bytes > tier.Capacity || tier.Free + tier.EvictableBytes < info.Bytes)
                return Room.NoRoom;
            if (!forced && !tier.Policy.ShouldAdmit(info))
            {
                tier.AdmissionRefusals++;
                return Room.Refused;
            }
        }
        return await MakeRoomAsync(t, info.Bytes).ConfigureAwait(false) ? Room.Reserved : Room.NoRoom;
    }

    private void Unreserve(int t, int bytes)
    {
        lock (_lock)
            _tiers[t].Reserved -= bytes;
    }

    private async ValueTask<bool> MakeRoomAsync(int t, int bytes)
    {
        var tier = _tiers[t];
        List<int>? stuck = null;
        try
        {
            while (true)
            {
                int victim;
                bool inPlace;
                lock (_lock)
                {
                    if (tier.Free >= bytes)
                    {
                        tier.Reserved += bytes;
                        return true;
                    }
                    if (!tier.Policy.TryPickVictim(out int h))
                        return false;
                    if ((uint)h >= (uint)tier.BlockOf.Length || tier.BlockOf[h] < 0 || !tier.Evictable[h])
                        throw new InvalidOperationException($"eviction policy '{tier.Policy.Name}' of the {tier.Kind} tier picked handle {h}, which is not an evictable resident block; the policy's state is out of step with the tier manager");
                    victim = tier.BlockOf[h];
                    inPlace = TryEvictInPlace(victim, t);
                    if (!inPlace)
                    {
                        _moving[victim] |= (byte)(1 << t);
                        RefreshEvictable(victim);
                    }
                }
                if (inPlace)
                {
                    FlushRemovals();
                    continue;
                }
                bool evicted = false;
                try
                {
                    evicted = await EvictAsync(victim, t).ConfigureAwait(false);
                }
                finally
                {
                    FlushRemovals();
                    if (!evicted)
                        (stuck ??= []).Add(victim); // also on an exception: the victim must not stay marked as moving
                }
            }
        }
        finally
        {
            if (stuck is not null)
            {
                lock (_lock)
                {
                    foreach (int b in stuck)
                    {
                        _moving[b] &= (byte)~(1 << t);
                        RefreshEvictable(b);
                    }
                }
            }
        }
    }

    // Evicts block b from tier t when that needs a copy (TryEvictInPlace has handled the cases that do not): copies it
    // down to the first slower tier that takes it, forced at the tier of its fastest child so that the
    // parent-not-slower-than-child invariant holds; a block with no cached child that no tier takes is dropped.
    // False when the block must stay (no tier could take it, a copy failed, or a reader grabbed it meanwhile).
    private async ValueTask<bool> EvictAsync(int b, int t)
    {
        PolicyBlockInfo info;
        BlockMeta meta;
        int childTier;
        lock (_lock)
        {
            info = InfoOf(b);
            meta = MetaOf(b);
            childTier = FastestChildTier(b);
        }
        for (int u = t + 1; u < _n && u <= childTier; u++)
        {
            bool forced = u == childTier;
            var room = await ReserveAsync(u, info, forced).ConfigureAwait(false);
            if (room != Room.Reserved)
            {
                if (forced)
                    return false;
                continue;
            }
            var copied = Copy.Failed;
            try
            {
                copied = await CopyAsync(info, meta, t, u).ConfigureAwait(false);
            }
            finally
            {
                if (copied != Copy.Done)
                    Unreserve(u, info.Bytes);
            }
            if (copied == Copy.SourceCorrupt)
            {
                // The store dropped the victim as corrupt: it has left tier t all the same.
                DropCorrupt(b, t);
                return true;
            }
            if (copied == Copy.Failed)
            {
                if (forced)
                    return false;
                continue;
            }
            lock (_lock)
            {
                _tiers[u].Reserved -= info.Bytes;
                AddResidency(b, u);
                _tiers[u].DemotionsIn++;
                _tiers[u].BytesMovedIn += info.Bytes;
                return CommitEviction(b, t);
            }
        }
        if (childTier < _n)
            return false;
        lock (_lock)
            return CommitEviction(b, t);
    }

    // Under _lock. Removes b from tier t unless a reader took it or a client pinned it meanwhile (Pin takes only the
    // lock, so it can land while the victim's copy runs); the store's bytes are freed by the caller's FlushRemovals once
    // the lock is released.
    private bool CommitEviction(int b, int t)
    {
        if (_inUse[b] > 0 || IsPinned(b))
            return false;
        var key = _key[b];
        RemoveResidency(b, t);
        _tiers[t].Evictions++;
        FreeBlockIfUnused(b);
        _removals.Add((key, _tiers[t]));
        return true;
    }

    // Evicts without I/O when possible (a slower copy already serves, or the last tier drops a leaf): under _lock, in
    // the same section that picked the victim.
    private bool TryEvictInPlace(int b, int t)
    {
        int childTier = FastestChildTier(b);
        for (int s = t + 1; s < _n; s++)
        {
            if (Holds(b, s))
                return s <= childTier && CommitEviction(b, t);
        }
        return t == _n - 1 && childTier == _n && CommitEviction(b, t);
    }

    // Removes from the stores what the metadata no longer names. Called by the mover (the only writer) outside _lock,
    // before its next store write: no reader can reach these bytes any more, and nothing can have rewritten the key.
    private void FlushRemovals()
    {
        foreach (var (key, tier) in _removals)
        {
            try
            {
                tier.Store.Remove(key);
            }
            catch (Exception e) when (e is TierException or IOException)
            {
                lock (_lock)
                    tier.StoreErrors++; // the bytes may linger in the store, but the tier no longer counts or serves them
            }
        }
        _removals.Clear();
    }

    private enum Copy : byte { Done, Failed, SourceCorrupt }

    // Copies a block's bytes from tier `from` to tier `to` through a pooled staging buffer.
    private async ValueTask<Copy> CopyAsync(PolicyBlockInfo info, BlockMeta meta, int from, int to)
    {
        byte[] staging = ArrayPool<byte>.Shared.Rent(info.Bytes);
        try
        {
            var buffer = staging.AsMemory(0, info.Bytes);
            try
            {
                if (!await ReadTimedAsync(_tiers[from], info.Key, buffer, CancellationToken.None).ConfigureAwait(false))
                    return Copy.Failed;
            }
            catch (BlockCorruptException)
            {
                return Copy.SourceCorrupt;
            }
            return await WriteAsync(_tiers[to], info.Key, meta, buffer).ConfigureAwait(false) ? Copy.Done : Copy.Failed;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(staging);
        }
    }

    private async ValueTask<bool> WriteAsync(TierState tier, BlockKey key, BlockMeta meta, ReadOnlyMemory<byte> bytes)
    {
        try
        {
            if (await tier.Store.WriteAsync(key, meta, bytes, CancellationToken.None).ConfigureAwait(false))
                return true;
        }
        catch (Exception e) when (e is TierException or IOException)
        {
            // A failing store (disk full, device error) loses this placement only; the manager keeps serving.
        }
        lock (_lock)
            tier.StoreErrors++;
        return false;
    }

    // A read whose duration refines the tier's bandwidth estimate. BlockCorruptException propagates (the store has
    // dropped the block; the caller repairs the metadata); other store failures read as false.
    private async ValueTask<bool> ReadTimedAsync(TierState tier, BlockKey key, Memory<byte> destination, CancellationToken ct)
    {
        long start = _time.GetTimestamp();
        bool ok;
        try
        {
            ok = await tier.Store.ReadAsync(key, destination, ct).ConfigureAwait(false);
        }
        catch (Exception e) when (e is TierException and not BlockCorruptException || e is IOException)
        {
            ok = false;
        }
        double elapsed = _time.GetElapsedTime(start).TotalSeconds;
        lock (_lock)
        {
            if (ok)
                tier.RecordRead(destination.Length, elapsed, _options.BandwidthSmoothing);
            else
                tier.StoreErrors++;
        }
        return ok;
    }
}
