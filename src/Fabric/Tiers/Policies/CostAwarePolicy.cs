namespace KvFabric.Tiers.Policies;

// The prefill work of one block, in dense-token equivalents: its tokens through the dense layers, plus attention over
// its prefix. Block d of T-token blocks holding n tokens attends, on average, over (d·T + n/2) earlier tokens, and a
// token attending over A tokens (the attention crossover) costs as much again as its dense layers.
public static class PrefillCost
{
    public const int DefaultAttentionCrossoverTokens = 32768;

    public static double OfBlock(int depth, int tokens, int tokensPerBlock, int attentionCrossoverTokens) =>
        tokens * (1.0 + (depth * (double)tokensPerBlock + tokens / 2.0) / attentionCrossoverTokens);
}

// Settings of the cost-aware policy. The defaults are model- and workload-neutral; docs/tiers-policies.md says why.
public sealed record CostAwareOptions
{
    // How many blocks the tier holds: sizes the frequency sketch and its ageing period.
    public required int ExpectedBlocks { get; init; }

    // Tokens in one block (the recompute cost is counted in tokens of prefill).
    public int TokensPerBlock { get; init; } = 512;

    // The context length at which a token's attention FLOPs equal its dense-layer FLOPs. Per token, the dense layers
    // cost about 2·P FLOPs and attention about 4·layers·d_model·context, so this is P / (2·layers·d_model): about 30k
    // tokens for Llama-3-8B, 53k for Llama-3-70B (GQA does not shrink the score and value FLOPs). Deeper blocks attend
    // over a longer prefix, so they cost more to recompute.
    public int AttentionCrossoverTokens { get; init; } = PrefillCost.DefaultAttentionCrossoverTokens;

    // Weigh blocks by their depth's prefill cost (cost(d) above) instead of by their tokens alone. Off by default: on the
    // conversation trace, deeper blocks valued more stayed too long for their reuse, and the weighting lowered both the
    // token hit rate and the prefill compute saved at 16,000 blocks and more (27.54% -> 28.62% tokens at 16k with it
    // off, 29.78% -> 30.75% at 21k), while 1k and 4k barely moved (docs/tiers-policies.md).
    public bool WeighDepth { get; init; }

    // Sightings between two halvings of the frequency sketch: how far back frequency remembers. Null: 20 ×
    // ExpectedBlocks, twice TinyLFU's 10 × because a put sights every block of its chain (the shared prefix and the
    // offered tail of a refused chain included), so a tier turns over in more sightings than in TinyLFU's one access
    // per request. The factor was chosen by a sweep on the conversation trace (docs/tiers-policies.md): 10× costs a
    // tenth of the hit rate at 1k and 4k blocks, 30× a little at 4k.
    public int? HistorySightings { get; init; }

    // Probation's share of the tier, fixed (0 = no probation: every first sighting must win the door duel, as in
    // TinyLFU; 1 = everything may be probation). Null: adapted online as in ARC (the default).
    public double? ProbationShare { get; init; }

    // Refuse, at the door, a first sighting worth less (frequency × cost) than the protected victim it would displace,
    // when the probation segment has adapted to nothing. False: every block is admitted.
    public bool Admission { get; init; } = true;
}

// A segmented Greedy-Dual-Size-Frequency policy over the evictable blocks of a tier: a probation segment for blocks
// seen for the first time and a protected segment for blocks with a history of reuse, whose split adapts as in ARC
// (Megiddo & Modha 2003), with the history taken from a decaying frequency sketch (TinyLFU, Einziger et al. 2017).
//
//   protected priority(b) = L + f(b) · cost(depth) / MiB(b)        (GDSF, Cherkasova 1998)
//   probation priority(b) = L + cost(depth) / MiB(b)               (GDS: cost-weighted LRU, Cao & Irani 1997)
//   cost(d)               = T (the block's tokens), or with WeighDepth PrefillCost.OfBlock(d, T, T, A) = T · (1 + (d + ½) · T / A)
//
// cost is the prefill work, in dense-token equivalents, of recomputing the block: its tokens, or with WeighDepth its
// work given its prefix, so that deeper blocks are worth more (off by default: measured, it did not pay; see
// WeighDepth). f is the sketch's decayed count of sightings of the key (puts, hits, admission requests), which outlives
// residency. L is the clock, raised to the priority of each victim, so blocks that stop being used age out.
//
// A block enters probation when the sketch has seen it once (this sighting), protected when it has been seen before;
// a hit in probation moves it to protected. The victim is the least-priority evictable block of probation while
// probation holds more than its target share p, else of protected. p adapts to the misses the split caused: a miss on
// a block that probation evicted (or refused) recently means probation was too small (p grows), a miss on a block that
// protected evicted means protected was (p shrinks, weighted by the block's frequency; see Sighting). Small tiers
// drift toward p ≈ 0 (only blocks with a history stay: TinyLFU-like), large ones toward the share their first reuses
// need (LRU-like). With admission on, ShouldAdmit refuses a first sighting worth less (frequency × cost) than the
// protected victim it would displace, whenever it would displace one: probation has no share (p < 1), or is at its
// share with nothing evictable (a long put in flight pins its own new blocks).
// Every operation is O(log n) (indexed binary heaps); memory is fixed by the tier's size; nothing allocates after
// warm-up.
public sealed class CostAwarePolicy : IEvictionPolicy
{
    private const double BytesPerMiB = 1 << 20;
    public const long DefaultHistoryFactor = 20;
    // A probation ghost hit grows p only when its ghost age is under max(GhostReachFactor × p, GhostReachFloor × the
    // tier's blocks) (see Sighting; chosen by the sweep in docs/tiers-policies.md).
    public const double GhostReachFactor = 64;
    public const double GhostReachFloor = 1.0 / 4;
    private const byte Absent = 0;
    private const byte Probation = 1;
    private const byte Protected = 2;

    private readonly CostAwareOptions _options;
    private readonly FrequencySketch _sketch;
    private readonly HandleHeap _probation;
    private readonly HandleHeap _protected;
    private readonly GhostSet _probationGhost;
    private readonly GhostSet _protectedGhost;
    private readonly int _capacity;
    private BlockKey[] _key;
    private int[] _depth;
    private int[] _bytes;
    private byte[] _segment;
    private int _probationCount;
    // The handle TryPickVictim returned last, until it is removed (-1: none).
    private int _picked = -1;
    private double _probationTarget;
    private double _clockL;
    private long _tick;
    // ShouldAdmit and the OnAdmit that follows it are one sighting of the block, counted once.
    private BlockKey _countedByAdmission;
    private bool _hasCountedByAdmission;
    // Set by the first OnSighting: the manager reports every use there, so admissions (which may be moves between
    // tiers) and accesses no longer count as sightings.
    private bool _sightingsReported;
    private BlockKey _sighted;
    private int _sightedF;

    public CostAwarePolicy(CostAwareOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.ExpectedBlocks, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.TokensPerBlock, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.AttentionCrossoverTokens, 1);
        if (options.ProbationShare is < 0 or > 1 || (options.ProbationShare is double share && double.IsNaN(share)))
            throw new ArgumentOutOfRangeException(nameof(options), options.ProbationShare, "ProbationShare is in [0, 1].");
        if (options.HistorySightings is < 1)
            throw new ArgumentOutOfRangeException(nameof(options), options.HistorySightings, "HistorySightings is positive.");
        _options = options;
        _capacity = options.ExpectedBlocks;
        _sketch = new FrequencySketch(options.HistorySightings ?? DefaultHistoryFactor * options.ExpectedBlocks);
        _probation = new HandleHeap(options.ExpectedBlocks);
        _protected = new HandleHeap(options.ExpectedBlocks);
        _probationTarget = (options.ProbationShare ?? 0) * options.ExpectedBlocks;
        _probationGhost = new GhostSet(options.ExpectedBlocks);
        _protectedGhost = new GhostSet(options.ExpectedBlocks);
        int n = HandleTable.InitialSize(options.ExpectedBlocks);
        _key = new BlockKey[n];
        _depth = new int[n];
        _bytes = new int[n];
        _segment = new byte[n];
    }

    public string Name => _options.Admission ? "cost" : "cost-noadmit";

    public CostAwareOptions Options => _options;

    // The ageing clock L, the probation target p and the segment sizes (for tests and diagnostics).
    public double Clock => _clockL;
    public double ProbationTarget => _probationTarget;
    public int ProbationCount => _probationCount;
    public int EvictableCount => _probation.Count + _protected.Count;

    // Recompute cost of a block at this depth, in dense-token equivalents: its tokens, or with WeighDepth its prefill
    // work given its prefix.
    public double RecomputeCost(int depth) => _options.WeighDepth
        ? PrefillCost.OfBlock(depth, _options.TokensPerBlock, _options.TokensPerBlock, _options.AttentionCrossoverTokens)
        : _options.TokensPerBlock;

    // Cost per MiB of a block: its priority above the clock for each sighting counted.
    public double Value(int depth, int bytes) => RecomputeCost(depth) / (Math.Max(bytes, 1) / BytesPerMiB);

    // The priority a resident block has now (for tests and diagnostics).
    public double PriorityOf(int handle)
    {
        byte seg = SegmentOf(handle);
        return (seg == Probation ? _probation : _protected).PriorityOf(handle);
    }

    public bool IsProtected(int handle) => SegmentOf(handle) == Protected;

    public int EstimatedFrequency(in BlockKey key) => _sketch.Estimate(key);

    // A use reported by the tier manager (see IEvictionPolicy.OnSighting): counted here, and from then on only here.
    public void OnSighting(in PolicyBlockInfo info)
    {
        _sightingsReported = true;
        _hasCountedByAdmission = false;
        _sightedF = Sighting(info.Key);
        _sighted = info.Key;
    }

    // The frequency of a block as of its last reported sighting (the count returned then, which a halving right after
    // it does not lower), else the sketch's estimate (a block moved in from another tier).
    private int ReportedFrequency(in BlockKey key) => _sighted == key && _sightedF > 0 ? _sightedF : _sketch.Estimate(key);

    public bool ShouldAdmit(in PolicyBlockInfo info)
    {
        int f = _sightingsReported ? ReportedFrequency(info.Key) : Sighting(info.Key);
        _countedByAdmission = info.Key;
        _hasCountedByAdmission = true;
        // A first sighting may displace a protected block only while probation is under its share: when probation has
        // no share (p < 1), or is at its share with nothing evictable (its blocks are the put in flight, pinned), the
        // block must be worth more than the protected victim.
        bool displacesProtected = _probationTarget < 1 || (_probationCount >= _probationTarget && _probation.Count == 0);
        if (!_options.Admission || f >= 2 || !displacesProtected || !_protected.TryPeek(out int victim))
            return true;
        if (f * Value(info.Depth, info.Bytes) > _sketch.Estimate(_key[victim]) * Value(_depth[victim], _bytes[victim]))
            return true;
        // Refused: as if evicted at once from a probation of size zero, which is what its ghost records.
        _probationGhost.Add(info.Key);
        return false;
    }

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(handle);
        if (handle >= _segment.Length)
            GrowTo(handle);
        if (_segment[handle] != Absent)
            throw HandleTable.AlreadyResident(Name, handle);
        int f = _sightingsReported ? ReportedFrequency(info.Key)
            : _hasCountedByAdmission && _countedByAdmission == info.Key ? _sketch.Estimate(info.Key) : Sighting(info.Key);
        _hasCountedByAdmission = false;
        _key[handle] = info.Key;
        _depth[handle] = info.Depth;
        _bytes[handle] = info.Bytes;
        if (f >= 2)
        {
            _segment[handle] = Protected;
            _protected.SetKey(handle, _clockL + f * Value(info.Depth, info.Bytes), ++_tick);
        }
        else
        {
            _segment[handle] = Probation;
            _probationCount++;
            _probation.SetKey(handle, _clockL + Value(info.Depth, info.Bytes), ++_tick);
        }
    }

    public void OnAccess(int handle)
    {
        byte seg = SegmentOf(handle);
        if (handle == _picked)
            _picked = -1; // used again: a pending pick of it was not carried out
        _hasCountedByAdmission = false;
        int f = _sightingsReported ? ReportedFrequency(_key[handle]) : _sketch.Increment(_key[handle]);
        double priority = _clockL + f * Value(_depth[handle], _bytes[handle]);
        if (seg == Probation)
        {
            // A hit proves reuse: the block moves to protected.
            bool evictable = _probation.Contains(handle);
            _probation.Remove(handle);
            _probationCount--;
            _segment[handle] = Protected;
            _protected.SetKey(handle, priority, ++_tick);
            if (evictable)
                _protected.Insert(handle);
        }
        else
        {
            _protected.SetKey(handle, priority, ++_tick);
        }
    }

    public void OnRemove(int handle)
    {
        byte seg = SegmentOf(handle);
        if (handle == _picked)
        {
            // The victim picked last has left: an eviction. Its ghost remembers it, and the GDSF clock rises to its
            // priority, so what stays must keep being used to stay ahead. (A pick the manager did not carry out, e.g. a
            // reader took the block during its copy, changes neither.)
            _picked = -1;
            (seg == Probation ? _probationGhost : _protectedGhost).Add(_key[handle]);
            _clockL = Math.Max(_clockL, (seg == Probation ? _probation : _protected).PriorityOf(handle));
        }
        if (seg == Probation)
        {
            _probation.Remove(handle);
            _probationCount--;
        }
        else
        {
            _protected.Remove(handle);
        }
        _segment[handle] = Absent;
    }

    public void SetEvictable(int handle, bool evictable)
    {
        var heap = SegmentOf(handle) == Probation ? _probation : _protected;
        if (evictable)
            heap.Insert(handle);
        else
            heap.Remove(handle);
    }

    public bool TryPickVictim(out int handle)
    {
        bool fromProbation = _probation.Count > 0 && (_probationCount > _probationTarget || _protected.Count == 0);
        var heap = fromProbation ? _probation : _protected;
        if (!heap.TryPeek(out handle))
            return false;
        _picked = handle; // its ghost and the clock follow when it leaves (OnRemove)
        return true;
    }

    // Counts a sighting of a block that is not resident, and adapts the split if a segment evicted it recently. Steps
    // are ARC's (the other ghost's size over this one's, at least 1), except that a miss on a block protected evicted
    // weighs its frequency f: probation would have given a first-sighting block one hit before it moved to protected
    // anyway, while a protected block that was evicted loses the hits its history predicts (the LFU assumption).
    private int Sighting(in BlockKey key)
    {
        int f = _sketch.Increment(key);
        if (_options.ProbationShare is not null)
            return f;
        if (_probationGhost.TryTake(key, out long ghostAge))
        {
            // Evidence for a larger probation only if a probation not far from today's would have kept the block: its
            // ghost age (keys probation evicted or refused after it) under GhostReachFactor × p, or under a quarter of
            // the tier while p is small (so an empty probation can still grow). A block that came back after most of a
            // tier's worth of later refusals says little about a probation of a few blocks (ARC counts it anyway).
            if (ghostAge < Math.Max(GhostReachFactor * _probationTarget, _capacity * GhostReachFloor))
                _probationTarget = Math.Min(_capacity, _probationTarget + Math.Max(1.0, (double)_protectedGhost.Count / Math.Max(1, _probationGhost.Count)));
        }
        else if (_protectedGhost.TryTake(key))
            _probationTarget = Math.Max(0, _probationTarget - f * Math.Max(1.0, (double)_probationGhost.Count / Math.Max(1, _protectedGhost.Count)));
        return f;
    }

    private byte SegmentOf(int handle)
    {
        if ((uint)handle >= (uint)_segment.Length || _segment[handle] == Absent)
            throw HandleTable.NotResident(Name, handle);
        return _segment[handle];
    }

    private void GrowTo(int handle)
    {
        int size = HandleTable.GrownSize(_segment.Length, handle);
        HandleTable.Grow(ref _key, size, default);
        HandleTable.Grow(ref _depth, size, 0);
        HandleTable.Grow(ref _bytes, size, 0);
        HandleTable.Grow(ref _segment, size, (byte)0);
    }
}
