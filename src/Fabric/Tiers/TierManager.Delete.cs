using KvFabric.Blocks;

namespace KvFabric.Tiers;

public sealed partial class TierManager
{
    // Deletes the block and every cached descendant (a descendant without its parent could never be looked up again).
    // Blocks that are pinned or in use by a transfer are kept, and so are their ancestors (leaf-first); KeptBusy counts them.
    public async ValueTask<DeleteResult> DeleteAsync(uint tenant, BlockHash hash, CancellationToken cancellationToken = default)
    {
        await _mover.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            int deleted, kept;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (!_index.TryGetValue(new BlockKey(tenant, hash), out int b))
                    return default;
                Tick();
                (deleted, kept) = DropSubtree(b, honorPins: true);
            }
            FlushRemovals();
            return new DeleteResult(deleted, kept);
        }
        finally
        {
            _mover.Release();
        }
    }

    // Removes the block only if nothing depends on it: no cached child, not pinned, not in use. What a failed put uses to
    // undo its own blocks (children first) without taking along blocks another caller has since built on. keep, when
    // given, is asked under the mover gate (so no put can see the block between the answer and the removal): true keeps it.
    public async ValueTask<bool> RemoveLeafAsync(uint tenant, BlockHash hash, CancellationToken cancellationToken = default, Func<bool>? keep = null)
    {
        await _mover.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            if (keep?.Invoke() == true)
                return false;
            int dropped;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                if (!_index.TryGetValue(new BlockKey(tenant, hash), out int b) || _firstChild[b] != None)
                    return false;
                Tick();
                (dropped, _) = DropSubtree(b, honorPins: true);
            }
            FlushRemovals();
            return dropped > 0;
        }
        finally
        {
            _mover.Release();
        }
    }

    // Drops every cached block in b's subtree, children before parents. A block in use by a transfer (or pinned, when
    // honorPins) is kept, and so is every ancestor of a kept block. Under _lock and the mover gate; the caller flushes the
    // store removals after the lock.
    private (int Dropped, int Kept) DropSubtree(int root, bool honorPins)
    {
        int dropped = 0, kept = 0;
        // Iterative post-order walk: visit children first, then the block itself.
        var stack = new Stack<(int Block, bool Expanded)>();
        stack.Push((root, false));
        while (stack.Count > 0)
        {
            var (b, expanded) = stack.Pop();
            if (!expanded)
            {
                stack.Push((b, true));
                for (int c = _firstChild[b]; c != None; c = _nextSibling[c])
                    stack.Push((c, false));
                continue;
            }
            if (_inUse[b] > 0 || (honorPins && IsPinned(b)) || _firstChild[b] != None)
            {
                if (_held[b] != 0)
                    kept++;
                continue;
            }
            if (_held[b] == 0)
            {
                FreeBlockIfUnused(b);
                continue;
            }
            var key = _key[b];
            for (int t = _n - 1; t >= 0; t--)
            {
                if (Holds(b, t))
                {
                    RemoveResidency(b, t);
                    _removals.Add((key, _tiers[t]));
                }
            }
            dropped++;
            FreeBlockIfUnused(b);
        }
        return (dropped, kept);
    }

    // Drops every block of every tier except those a transfer relies on: a block in use (a read or a transfer reading it
    // in place) or pinned by a lease stays, with its ancestors (leaf-first), so a Clear never pulls bytes out from under
    // a transfer; the result counts both. Events say exactly what went: when nothing stays, one Cleared per tier (every
    // block of the tier is gone); when something stays, a Removed per dropped copy, and no Cleared.
    public async ValueTask<ClearResult> ClearAsync(CancellationToken cancellationToken = default)
    {
        await _mover.WaitAsync(cancellationToken).ConfigureAwait(false);
        try
        {
            int dropped = 0, kept = 0;
            lock (_lock)
            {
                ObjectDisposedException.ThrowIf(_disposed, this);
                Tick();
                bool anyBusy = false;
                var roots = new List<int>();
                foreach (var (_, b) in _index)
                {
                    anyBusy |= _inUse[b] > 0 || IsPinned(b);
                    if (_parent[b] == None)
                        roots.Add(b);
                }
                _muted = !anyBusy; // one Cleared per tier instead of a Removed per block
                try
                {
                    foreach (int root in roots)
                    {
                        var (d, k) = DropSubtree(root, honorPins: true);
                        dropped += d;
                        kept += k;
                    }
                }
                finally
                {
                    _muted = false;
                }
                if (!anyBusy)
                {
                    foreach (var tier in _tiers)
                    {
                        ++_sequence;
                        _events?.OnEvent(new KvEvent(_sequence, KvEventKind.Cleared, 0, tier.Kind, default, default, 0));
                    }
                }
            }
            FlushRemovals();
            return new ClearResult(dropped, kept);
        }
        finally
        {
            _mover.Release();
        }
    }
}
