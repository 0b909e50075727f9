namespace KvFabric.Tiers.Policies;

// An indexed binary min-heap over dense handles, ordered by (priority, tie) — the tie being a logical clock, so equal
// priorities leave the oldest first and the order is deterministic. Position per handle makes update and removal of
// any member O(log n); nothing allocates once the arrays cover the handle space.
internal sealed class HandleHeap
{
    private int[] _heap;
    private int[] _position; // -1 when not in the heap
    private double[] _priority;
    private long[] _tie;

    public HandleHeap(int capacityHint)
    {
        int n = HandleTable.InitialSize(capacityHint);
        _heap = new int[n];
        _position = new int[n];
        _position.AsSpan().Fill(-1);
        _priority = new double[n];
        _tie = new long[n];
    }

    public int Count { get; private set; }

    public bool Contains(int handle) => (uint)handle < (uint)_position.Length && _position[handle] >= 0;

    public double PriorityOf(int handle) => _priority[handle];

    public long TieOf(int handle) => _tie[handle];

    // Sets a handle's key whether or not it is in the heap; a member moves to its new place.
    public void SetKey(int handle, double priority, long tie)
    {
        EnsureHandle(handle);
        double oldPriority = _priority[handle];
        long oldTie = _tie[handle];
        _priority[handle] = priority;
        _tie[handle] = tie;
        int i = _position[handle];
        if (i < 0)
            return;
        if (Less(priority, tie, oldPriority, oldTie))
            SiftUp(i);
        else
            SiftDown(i);
    }

    public void Insert(int handle)
    {
        EnsureHandle(handle);
        if (_position[handle] >= 0)
            return;
        if (Count == _heap.Length)
            HandleTable.Grow(ref _heap, _heap.Length * 2, 0);
        _heap[Count] = handle;
        _position[handle] = Count;
        Count++;
        SiftUp(Count - 1);
    }

    public void Remove(int handle)
    {
        if (!Contains(handle))
            return;
        int i = _position[handle];
        _position[handle] = -1;
        Count--;
        if (i == Count)
            return;
        int last = _heap[Count];
        _heap[i] = last;
        _position[last] = i;
        SiftUp(i);
        SiftDown(_position[last]);
    }

    public bool TryPeek(out int handle)
    {
        handle = Count > 0 ? _heap[0] : -1;
        return Count > 0;
    }

    private static bool Less(double p1, long t1, double p2, long t2) => p1 < p2 || (p1 == p2 && t1 < t2);

    private bool Less(int a, int b) => Less(_priority[a], _tie[a], _priority[b], _tie[b]);

    private void SiftUp(int i)
    {
        int h = _heap[i];
        while (i > 0)
        {
            int parent = (i - 1) >> 1;
            int ph = _heap[parent];
            if (!Less(h, ph))
                break;
            _heap[i] = ph;
            _position[ph] = i;
            i = parent;
        }
        _heap[i] = h;
        _position[h] = i;
    }

    private void SiftDown(int i)
    {
        int h = _heap[i];
        while (true)
        {
            int child = 2 * i + 1;
            if (child >= Count)
                break;
            if (child + 1 < Count && Less(_heap[child + 1], _heap[child]))
                child++;
            int ch = _heap[child];
            if (!Less(ch, h))
                break;
            _heap[i] = ch;
            _position[ch] = i;
            i = child;
        }
        _heap[i] = h;
        _position[h] = i;
    }

    private void EnsureHandle(int handle)
    {
        if (handle < _position.Length)
            return;
        int size = HandleTable.GrownSize(_position.Length, handle);
        HandleTable.Grow(ref _position, size, -1);
        HandleTable.Grow(ref _priority, size, 0.0);
        HandleTable.Grow(ref _tie, size, 0L);
    }
}
