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

    // Sightings between two halvings of the frequency sketch: how far back frequency remembers. Null: TinyLFU's
    // 10 × ExpectedBlocks. docs/tiers-policies.md shows how much the best value depends on the workload.
    public int? HistorySightings { get; init; }

    // Refuse, at the door, a block worth less (frequency × cost) than the victim it would displace.
    public bool Admission { get; init; } = true;
}

// Greedy-Dual-Size-Frequency (Cao & Irani 1997; Cherkasova 1998) over the evictable blocks of a tier, with the
// frequency taken from a decaying sketch that outlives residency, and TinyLFU-style admission (Einziger et al. 2017):
//
//   priority(b) = L + f(b) · cost(depth) / MiB(b)
//   cost(d)     = T · (1 + (d + ½) · T / A)          [T = tokens per block, A = AttentionCrossoverTokens]
//
// cost is the prefill work, in dense-token equivalents, of recomputing block d given its prefix: T tokens of dense
// layers plus attention over (d + ½)·T tokens on average. f is the sketch's decayed count of sightings of the key
// (puts, hits, admission requests). L is the clock, raised to the priority of each victim, so blocks that stop being
// used age out behind newer ones. The victim is the evictable block of least priority (the oldest on ties).
// ShouldAdmit refuses a block worth less (f × cost per MiB, without the clock) than the victim it would displace, so a
// one-shot block never pushes out one with a history of reuse. Every operation is O(log n) in the handles (an indexed
// binary heap); memory is fixed by the tier's size; nothing allocates after warm-up.
public sealed class CostAwarePolicy : IEvictionPolicy
{
    private const double BytesPerMiB = 1 << 20;

    private readonly CostAwareOptions _options;
    private readonly FrequencySketch _sketch;
    private readonly HandleHeap _heap;
    private BlockKey[] _key;
    private int[] _depth;
    private int[] _bytes;
    private bool[] _resident;
    private double _clockL;
    private long _tick;
    // ShouldAdmit and the OnAdmit that follows it are one sighting of the block, counted once.
    private BlockKey _countedByAdmission;
    private bool _hasCountedByAdmission;

    public CostAwarePolicy(CostAwareOptions options)
    {
        ArgumentNullException.ThrowIfNull(options);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.ExpectedBlocks, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.TokensPerBlock, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(options.AttentionCrossoverTokens, 1);
        _options = options;
        if (options.HistorySightings is < 1)
            throw new ArgumentOutOfRangeException(nameof(options), options.HistorySightings, "HistorySightings is positive.");
        _sketch = new FrequencySketch(options.ExpectedBlocks, options.HistorySightings ?? 10L * options.ExpectedBlocks);
        _heap = new HandleHeap(options.ExpectedBlocks);
        int n = HandleTable.InitialSize(options.ExpectedBlocks);
        _key = new BlockKey[n];
        _depth = new int[n];
        _bytes = new int[n];
        _resident = new bool[n];
    }

    public string Name => _options.Admission ? "cost" : "cost-noadmit";

    public CostAwareOptions Options => _options;

    // The ageing clock L (for tests and diagnostics).
    public double Clock => _clockL;

    public int EvictableCount => _heap.Count;

    // Recompute cost of a block at this depth, in dense-token equivalents.
    public double RecomputeCost(int depth) =>
        PrefillCost.OfBlock(depth, _options.TokensPerBlock, _options.TokensPerBlock, _options.AttentionCrossoverTokens);

    // Cost per MiB of a block: its priority above the clock for each sighting counted.
    public double Value(int depth, int bytes) => RecomputeCost(depth) / (Math.Max(bytes, 1) / BytesPerMiB);

    // The priority a resident block has now (for tests and diagnostics).
    public double PriorityOf(int handle)
    {
        CheckResident(handle);
        return _heap.PriorityOf(handle);
    }

    public int EstimatedFrequency(in BlockKey key) => _sketch.Estimate(key);

    public bool ShouldAdmit(in PolicyBlockInfo info)
    {
        int f = _sketch.Increment(info.Key);
        _countedByAdmission = info.Key;
        _hasCountedByAdmission = true;
        if (!_options.Admission || !_heap.TryPeek(out int victim))
            return true;
        return f * Value(info.Depth, info.Bytes) > _sketch.Estimate(_key[victim]) * Value(_depth[victim], _bytes[victim]);
    }

    public void OnAdmit(int handle, in PolicyBlockInfo info)
    {
        ArgumentOutOfRangeException.ThrowIfNegative(handle);
        if (handle >= _resident.Length)
            GrowTo(handle);
        if (_resident[handle])
            throw HandleTable.AlreadyResident(Name, handle);
        int f = _hasCountedByAdmission && _countedByAdmission == info.Key ? _sketch.Estimate(info.Key) : _sketch.Increment(info.Key);
        _hasCountedByAdmission = false;
        _resident[handle] = true;
        _key[handle] = info.Key;
        _depth[handle] = info.Depth;
        _bytes[handle] = info.Bytes;
        _heap.SetKey(handle, _clockL + f * Value(info.Depth, info.Bytes), ++_tick);
    }

    public void OnAccess(int handle)
    {
        CheckResident(handle);
        _hasCountedByAdmission = false;
        int f = _sketch.Increment(_key[handle]);
        _heap.SetKey(handle, _clockL + f * Value(_depth[handle], _bytes[handle]), ++_tick);
    }

    public void OnRemove(int handle)
    {
        CheckResident(handle);
        _heap.Remove(handle);
        _resident[handle] = false;
    }

    public void SetEvictable(int handle, bool evictable)
    {
        CheckResident(handle);
        if (evictable)
            _heap.Insert(handle);
        else
            _heap.Remove(handle);
    }

    public bool TryPickVictim(out int handle)
    {
        if (!_heap.TryPeek(out handle))
            return false;
        // GDSF: the clock rises to the victim's priority, so what stays must keep being used to stay ahead.
        _clockL = Math.Max(_clockL, _heap.PriorityOf(handle));
        return true;
    }

    private void CheckResident(int handle)
    {
        if ((uint)handle >= (uint)_resident.Length || !_resident[handle])
            throw HandleTable.NotResident(Name, handle);
    }

    private void GrowTo(int handle)
    {
        int size = HandleTable.GrownSize(_resident.Length, handle);
        HandleTable.Grow(ref _key, size, default);
        HandleTable.Grow(ref _depth, size, 0);
        HandleTable.Grow(ref _bytes, size, 0);
        HandleTable.Grow(ref _resident, size, false);
    }
}
