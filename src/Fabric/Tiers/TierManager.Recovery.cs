namespace KvFabric.Tiers;

public sealed partial class TierManager
{
    // Rebuilds the metadata of a durable tier (the SSD store after a restart) from what it recovered, parents before
    // children, publishing a Stored event per block so the index learns what survived. A recovered block whose parent did
    // not survive could never be looked up again: it is removed from the store. Only the last tier may start non-empty,
    // so the parent-not-slower-than-child invariant holds trivially.
    private void RecoverDurableTiers()
    {
        for (int t = 0; t < _n; t++)
        {
            if (_tiers[t].Store is not IDurableBlockStore durable || durable.Recovered.Count == 0)
                continue;
            var tier = _tiers[t];
            if (t != _n - 1)
                throw new ArgumentException($"the {tier.Kind} store recovered {durable.Recovered.Count} blocks, but only the last (slowest) tier may start non-empty; order it last or clear it", nameof(_options));
            var recovered = durable.Recovered.OrderBy(kv => kv.Value.Depth).ToList();
            lock (_lock)
            {
                foreach (var (key, meta) in recovered)
                {
                    int parent = None;
                    bool orphan = meta.Depth > 0 && (!_index.TryGetValue(new BlockKey(key.Tenant, meta.Parent), out parent) || _depth[parent] != meta.Depth - 1);
                    bool misfit = meta.Length <= 0 || (tier.FixedBlockBytes != 0 && meta.Length != tier.FixedBlockBytes)
                        || tier.Used + meta.Length > tier.Capacity || _index.ContainsKey(key);
                    if (orphan || misfit)
                    {
                        _removals.Add((key, tier));
                        continue;
                    }
                    int b = NewBlock(key, parent, meta.Depth, meta.Length);
                    AddResidency(b, t);
                    tier.BytesIn -= meta.Length; // recovered, not written
                }
            }
            FlushRemovals();
        }
    }
}
