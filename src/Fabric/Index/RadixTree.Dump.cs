using KvFabric.Blocks;
using KvFabric.Tiers;

namespace KvFabric.Index;

public sealed unsafe partial class RadixTree
{
    // The whole tree (or one worker's part) as Stored runs, parents first: the snapshot a subscriber replays.
    // Walks the tree depth-first so that each (worker, tier) run follows a chain as far as it goes. Blocks below an entry
    // that nobody holds are left out: Match cannot reach them and a replay would reject them as orphans.
    // Allocates O(blocks) of temporary arrays; it is a snapshot, not a hot path.
    public void Dump(List<StoredRun> output, int? worker = null)
    {
        ArgumentNullException.ThrowIfNull(output);
        if (_count == 0)
            return;
        if (_count > Array.MaxLength || _arenaTop > Array.MaxLength)
            throw new InvalidOperationException($"Dump handles at most {Array.MaxLength} blocks; this tree has {_count}");

        // Ordinals for live entries (in arena order), then children lists (CSR) keyed by the parent's ordinal.
        int n = (int)_count;
        var refOf = new uint[n];
        var ordinalOf = new int[_arenaTop];
        int next = 0;
        for (uint r = 1; r < _arenaTop; r++)
        {
            if (!_arena[r].IsEmpty)
            {
                ordinalOf[r] = next;
                refOf[next++] = r;
            }
        }
        var parentOf = new int[n];
        var childStart = new int[n + 1];
        var roots = new List<int>();
        for (int o = 0; o < n; o++)
        {
            ref Entry e = ref _arena[refOf[o]];
            if (e.IsRoot)
            {
                parentOf[o] = -1;
                roots.Add(o);
                continue;
            }
            uint pr = FindRef(e.ParentHi, e.ParentLo);
            parentOf[o] = pr == 0 ? -1 : ordinalOf[pr]; // absent parent cannot happen: Children keeps it alive
            if (pr != 0)
                childStart[parentOf[o] + 1]++;
        }
        for (int o = 0; o < n; o++)
            childStart[o + 1] += childStart[o];
        var children = new int[childStart[n]];
        var fill = (int[])childStart.Clone();
        for (int o = 0; o < n; o++)
        {
            if (parentOf[o] >= 0)
                children[fill[parentOf[o]]++] = o;
        }

        var open = new Dictionary<int, RunBuilder>();
        var runs = new List<RunBuilder>();
        var stack = new Stack<int>();
        for (int r = roots.Count - 1; r >= 0; r--)
            stack.Push(roots[r]);
        while (stack.Count > 0)
        {
            int o = stack.Pop();
            ref Entry e = ref _arena[refOf[o]];
            if (!e.IsHeld)
                continue; // nobody holds it: its subtree is unreachable
            var hash = new BlockHash(e.Hi, e.Lo);
            BlockHash? parent = e.IsRoot ? null : new BlockHash(e.ParentHi, e.ParentLo);
            for (int k = 0; k < InlineLocations; k++)
            {
                if (e.Loc[k] != 0)
                    AddToRuns(e.Loc[k], hash, parent, worker, open, runs);
            }
            if (e.Overflow != 0)
            {
                int count = VectorCount(_pool[e.Overflow]);
                for (int k = 1; k <= count; k++)
                    AddToRuns(_pool[e.Overflow + k], hash, parent, worker, open, runs);
            }
            for (int c = childStart[o + 1] - 1; c >= childStart[o]; c--)
                stack.Push(children[c]);
        }
        // Runs in the order they started: a run's parent block lies in a run that started before it.
        foreach (var run in runs)
            output.Add(new StoredRun(run.Worker, run.Parent, [.. run.Hashes], run.Tier));
    }

    private static void AddToRuns(uint loc, BlockHash hash, BlockHash? parent, int? only, Dictionary<int, RunBuilder> open, List<RunBuilder> runs)
    {
        int w = (int)(loc >> 3) - 1;
        if (only is { } ow && ow != w)
            return;
        for (int t = 0; t < 3; t++)
        {
            if ((loc & (1u << t)) == 0)
                continue;
            int key = w * 3 + t;
            if (open.TryGetValue(key, out var run) && parent is { } p && run.Hashes[^1] == p)
            {
                run.Hashes.Add(hash);
                continue;
            }
            run = new RunBuilder(w, (TierKind)t, parent);
            run.Hashes.Add(hash);
            open[key] = run;
            runs.Add(run);
        }
    }

    private sealed class RunBuilder(int worker, TierKind tier, BlockHash? parent)
    {
        public int Worker { get; } = worker;
        public TierKind Tier { get; } = tier;
        public BlockHash? Parent { get; } = parent;
        public List<BlockHash> Hashes { get; } = [];
    }
}
