namespace KvFabric.Index;

// Locations are (node, worker) pairs interned to small ints: entries pack them into 28 bits, and Match indexes its
// per-worker scratch by them. Ids are never reused, so a node that rejoins gets its old ids back.
public sealed partial class RadixIndex
{
    private readonly Lock _workersLock = new();
    private readonly Dictionary<(string Node, string Worker), int> _workerIds = [];
    private readonly List<(string Node, string Worker)> _workerNames = [];
    private readonly Dictionary<string, List<int>> _nodeWorkers = new(StringComparer.Ordinal);

    public int WorkerIdOf(string node, string worker)
    {
        ArgumentException.ThrowIfNullOrEmpty(node);
        ArgumentException.ThrowIfNullOrEmpty(worker);
        lock (_workersLock)
        {
            if (_workerIds.TryGetValue((node, worker), out int id))
                return id;
            id = _workerNames.Count;
            if (id > RadixTree.MaxWorkerId)
                throw new InvalidOperationException($"the index has interned {id} workers, its limit; restart the index to drop departed workers");
            _workerIds[(node, worker)] = id;
            _workerNames.Add((node, worker));
            if (!_nodeWorkers.TryGetValue(node, out var list))
                _nodeWorkers[node] = list = [];
            list.Add(id);
            return id;
        }
    }

    public (string Node, string Worker) WorkerOf(int id)
    {
        lock (_workersLock)
        {
            if ((uint)id >= (uint)_workerNames.Count)
                throw new ArgumentOutOfRangeException(nameof(id), id, $"no worker has id {id}; ids come from WorkerIdOf ({_workerNames.Count} interned)");
            return _workerNames[id];
        }
    }

    private int[] WorkersOfNode(string node)
    {
        lock (_workersLock)
            return _nodeWorkers.TryGetValue(node, out var list) ? [.. list] : [];
    }
}
