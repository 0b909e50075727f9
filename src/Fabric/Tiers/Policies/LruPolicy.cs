namespace KvFabric.Tiers.Policies;

// Least recently used among the evictable blocks of one tier.
//
// Recency is a logical clock stamped on every admit and access. Evictable handles sit in an intrusive doubly-linked
// list over arrays, ordered by stamp (head = least recent), so picking a victim and moving an accessed block to the
// tail are O(1). A handle that becomes evictable again (its last child left the tier, or its pin was released) is
// inserted at its stamp's place, searched from both ends at once: the tier manager's two patterns are O(1) that way
// (an unpinned block was just used, so it belongs at the tail; a parent exposed by evicting its last child is about as
// old as that child, which was the head). Nothing allocates per operation once the arrays cover the tier.
public sealed class LruPolicy : IEvictionPolicy
{
    private const int None = -1;

    private long[] _stamp;
    private int[] _prev;
    private int[] _next;
    private byte[] _state; // 0 = absent, Resident, Resident | Evictable
    private const byte Resident = 1;
    private const byte Evictable = 2;
    private int _head = None;
    private int _tail = None;
    private long _clock;

    public LruPolicy(int capacityHint = 0)
    {
        int n = HandleTable.InitialSize(capacityHint);
        _stamp = new long[n];
        _prev = new int[n];
        _next = new int[n];
        _state = new byte[n];
    }

    public string Name => "lru";

    // Number of resident handles and of those that are evictable (for tests and diagnostics).
    public int ResidentCount { get; private set; }
    public int EvictableCount { get; private set; }

    public bool ShouldAdmit(in PolicyBlockInfo info) => true;

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        if (handle >= _state.Length)
            GrowTo(handle);
        if (handle < 0)
            throw new ArgumentOutOfRangeException(nameof(handle), handle, "Handles are non-negative.");
        if (_state[handle] != 0)
            throw HandleTable.AlreadyResident(Name, handle);
        _state[handle] = Resident;
        _stamp[handle] = ++_clock;
        ResidentCount++;
    }

    public void OnAccess(int handle)
    {
        byte s = StateOf(handle);
        _stamp[handle] = ++_clock;
        if ((s & Evictable) != 0 && _tail != handle)
        {
            Unlink(handle);
            LinkAfter(_tail, handle);
        }
    }

    public void OnRemove(int handle)
    {
        byte s = StateOf(handle);
        if ((s & Evictable) != 0)
        {
            Unlink(handle);
            EvictableCount--;
        }
        _state[handle] = 0;
        ResidentCount--;
    }

    public void SetEvictable(int handle, bool evictable)
    {
        byte s = StateOf(handle);
        bool now = (s & Evictable) != 0;
        if (now == evictable)
            return;
        if (evictable)
        {
            InsertByStamp(handle);
            _state[handle] = Resident | Evictable;
            EvictableCount++;
        }
        else
        {
            Unlink(handle);
            _state[handle] = Resident;
            EvictableCount--;
        }
    }

    public bool TryPickVictim(out int handle)
    {
        handle = _head;
        return _head != None;
    }

    private byte StateOf(int handle)
    {
        if ((uint)handle >= (uint)_state.Length || _state[handle] == 0)
            throw HandleTable.NotResident(Name, handle);
        return _state[handle];
    }

    // Walks from the tail backwards and from the head forwards in step; stops at whichever finds the place first.
    private void InsertByStamp(int handle)
    {
        long stamp = _stamp[handle];
        int fromTail = _tail;
        int fromHead = _head;
        while (fromTail != None)
        {
            if (_stamp[fromTail] < stamp)
            {
                LinkAfter(fromTail, handle);
                return;
            }
            if (_stamp[fromHead] > stamp)
            {
                LinkAfter(_prev[fromHead], handle);
                return;
            }
            fromTail = _prev[fromTail];
            fromHead = _next[fromHead];
        }
        LinkAfter(None, handle);
    }

    // Links handle after node (None = at the head).
    private void LinkAfter(int node, int handle)
    {
        int next = node == None ? _head : _next[node];
        _prev[handle] = node;
        _next[handle] = next;
        if (node == None)
            _head = handle;
        else
            _next[node] = handle;
        if (next == None)
            _tail = handle;
        else
            _prev[next] = handle;
    }

    private void Unlink(int handle)
    {
        int p = _prev[handle];
        int n = _next[handle];
        if (p == None)
            _head = n;
        else
            _next[p] = n;
        if (n == None)
            _tail = p;
        else
            _prev[n] = p;
    }

    private void GrowTo(int handle)
    {
        int size = HandleTable.GrownSize(_state.Length, handle);
        HandleTable.Grow(ref _stamp, size, 0L);
        HandleTable.Grow(ref _prev, size, 0);
        HandleTable.Grow(ref _next, size, 0);
        HandleTable.Grow(ref _state, size, (byte)0);
    }
}
