using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Workers.Serving;

namespace KvFabric.Workers.Driver;

/// <summary>
/// Picks the workers of a request. Prefill: the index's Route (the worker whose node holds the longest cached prefix,
/// net of load), mapped to the prefill worker of that name; round robin when the index cannot answer or names no
/// prefill worker. Decode: the decode worker with the fewest requests this router has in flight on it.
/// </summary>
public sealed class Router
{
    private readonly IReadOnlyList<WorkerClient> _prefill;
    private readonly IReadOnlyList<WorkerClient> _decode;
    private readonly Dictionary<string, WorkerClient> _byName;
    private readonly FabricClient _index;
    private readonly KvLayout _layout;
    private readonly string _tenant;
    private readonly int[] _inFlight;
    private int _roundRobin;
    private long _routed, _fallbacks;

    public Router(IReadOnlyList<WorkerClient> prefill, IReadOnlyList<WorkerClient> decode, FabricClient index, KvLayout layout, string tenant)
    {
        if (prefill.Count == 0 || decode.Count == 0)
            throw new ArgumentException($"a disaggregated deployment needs at least one prefill and one decode worker; got {prefill.Count} and {decode.Count}");
        _prefill = prefill;
        _decode = decode;
        _byName = prefill.ToDictionary(w => w.Name, StringComparer.Ordinal);
        _index = index;
        _layout = layout;
        _tenant = tenant;
        _inFlight = new int[decode.Count];
    }

    public IReadOnlyList<WorkerClient> Decoders => _decode;
    /// <summary>Prefill choices made by Route / by round robin because Route could not answer.</summary>
    public long Routed => Interlocked.Read(ref _routed);
    public long Fallbacks => Interlocked.Read(ref _fallbacks);

    /// <param name="exclude">Workers not to pick (a retry's failed ones); when Route names one of them, round robin over the rest.</param>
    public async Task<WorkerClient> PickPrefillAsync(ReadOnlyMemory<int> prompt, CancellationToken cancellationToken, IReadOnlyCollection<WorkerClient>? exclude = null)
    {
        if (exclude is { Count: > 0 } && !_prefill.Any(w => !exclude.Contains(w)))
            throw new InvalidOperationException("no other prefill worker to retry on");
        int full = prompt.Length / _layout.TokensPerBlock;
        if (full > 0 && _prefill.Count > 1)
        {
            var hashes = new BlockHash[full];
            BlockHasher.ComputeChain(_tenant, _layout, prompt.Span, hashes);
            byte[] packed = new byte[full * BlockHash.Size];
            for (int i = 0; i < full; i++)
                hashes[i].WriteTo(packed.AsSpan(i * BlockHash.Size));
            try
            {
                RouteResponse route = await _index.RouteAsync(packed, options: new CallOptions(TimeSpan.FromSeconds(2), cancellationToken)).ConfigureAwait(false);
                if (_byName.TryGetValue(route.Worker, out WorkerClient? chosen) && exclude?.Contains(chosen) != true)
                {
                    Interlocked.Increment(ref _routed);
                    return chosen;
                }
            }
            catch (RpcException) when (!cancellationToken.IsCancellationRequested)
            {
                // The index is an optimisation: without it, spread the load.
            }
        }

        if (_prefill.Count > 1)
            Interlocked.Increment(ref _fallbacks);
        // At most one turn around the workers (concurrent picks move the counter too; then the first allowed one).
        for (int i = 0; i < _prefill.Count; i++)
        {
            WorkerClient w = _prefill[(int)((uint)Interlocked.Increment(ref _roundRobin) % (uint)_prefill.Count)];
            if (exclude?.Contains(w) != true)
                return w;
        }

        return _prefill.First(p => exclude?.Contains(p) != true);
    }

    /// <summary>The least-loaded decode worker not in exclude; dispose the lease when the request is done with it.</summary>
    public DecodeLease PickDecode(IReadOnlyCollection<WorkerClient>? exclude = null)
    {
        lock (_inFlight)
        {
            int best = -1;
            for (int i = 0; i < _decode.Count; i++)
            {
                if (exclude?.Contains(_decode[i]) != true && (best < 0 || _inFlight[i] < _inFlight[best]))
                    best = i;
            }

            if (best < 0)
                throw new InvalidOperationException("no other decode worker to retry on");
            _inFlight[best]++;
            return new DecodeLease(this, best);
        }
    }

    /// <summary>Whether a decode / prefill worker outside exclude is left (a retry has somewhere to go).</summary>
    public bool HasDecoderBesides(IReadOnlyCollection<WorkerClient> exclude) => _decode.Any(d => !exclude.Contains(d));

    public bool HasPrefillBesides(IReadOnlyCollection<WorkerClient> exclude) => _prefill.Any(p => !exclude.Contains(p));

    public sealed class DecodeLease(Router router, int index) : IDisposable
    {
        private int _done;
        public WorkerClient Worker => router._decode[index];

        public void Dispose()
        {
            if (Interlocked.Exchange(ref _done, 1) == 0)
            {
                lock (router._inFlight)
                    router._inFlight[index]--;
            }
        }
    }
}
