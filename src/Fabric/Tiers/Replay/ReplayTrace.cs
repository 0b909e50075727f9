using System.Text.Json;
using KvFabric.Blocks;

namespace KvFabric.Tiers.Replay;

// One request of a trace: its prompt length and the slice of the trace's block chain it reads.
public readonly record struct TraceRequest(long TimestampMs, int InputLength, int OutputLength, int ChainStart, int ChainLength);

// A request trace in the Mooncake format (FAST'25 release): one JSON object per line with timestamp (ms),
// input_length, output_length and hash_ids, the ids of the prompt's chained blocks (block i covers tokens
// [i·T, (i+1)·T); the last block may be partial). Ids become BlockKeys of tenant 0 whose hash is the id, and dense
// ids 0..DistinctBlocks-1 for the offline oracles.
public sealed class ReplayTrace
{
    private readonly TraceRequest[] _requests;
    private readonly BlockKey[] _keys;
    private readonly int[] _dense;

    public ReplayTrace(int tokensPerBlock, IReadOnlyList<(long TimestampMs, int InputLength, int OutputLength, long[] HashIds)> requests)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(tokensPerBlock, 1);
        ArgumentNullException.ThrowIfNull(requests);
        TokensPerBlock = tokensPerBlock;
        _requests = new TraceRequest[requests.Count];
        int total = 0;
        foreach (var r in requests)
            total = checked(total + r.HashIds.Length);
        _keys = new BlockKey[total];
        _dense = new int[total];
        var ids = new Dictionary<long, int>();
        int at = 0;
        for (int i = 0; i < requests.Count; i++)
        {
            var (ts, input, output, hashIds) = requests[i];
            if (input <= 0)
                throw new InvalidDataException($"Request {i}: input_length {input} is not positive.");
            long expected = (input + (long)tokensPerBlock - 1) / tokensPerBlock;
            if (hashIds.Length != expected)
            {
                throw new InvalidDataException(
                    $"Request {i}: {hashIds.Length} hash_ids for input_length {input}, but {tokensPerBlock}-token blocks need {expected}; " +
                    "is --tokens-per-block the trace's block size (512 for the Mooncake traces)?");
            }
            _requests[i] = new TraceRequest(ts, input, output, at, hashIds.Length);
            foreach (long id in hashIds)
            {
                if (id < 0)
                    throw new InvalidDataException($"Request {i}: hash id {id} is negative.");
                if (!ids.TryGetValue(id, out int dense))
                {
                    dense = ids.Count;
                    ids.Add(id, dense);
                }
                _keys[at] = new BlockKey(0, new BlockHash(0, (ulong)id));
                _dense[at] = dense;
                at++;
            }
        }
        DistinctBlocks = ids.Count;
        MaxChainLength = _requests.Length == 0 ? 0 : _requests.Max(r => r.ChainLength);
    }

    public int TokensPerBlock { get; }
    public int DistinctBlocks { get; }
    public int MaxChainLength { get; }
    public int Count => _requests.Length;
    public int BlockReferences => _keys.Length;
    public ReadOnlySpan<TraceRequest> Requests => _requests;

    public TraceRequest this[int index] => _requests[index];

    public ReadOnlySpan<BlockKey> Chain(int index) => _keys.AsSpan(_requests[index].ChainStart, _requests[index].ChainLength);

    public ReadOnlySpan<int> DenseChain(int index) => _dense.AsSpan(_requests[index].ChainStart, _requests[index].ChainLength);

    // Blocks of request `index` that hold tokens_per_block tokens: only these are ever stored.
    public int FullBlocks(int index) => _requests[index].InputLength / TokensPerBlock;

    // Tokens of block `position` that a request of this input length actually holds (the last block may be partial).
    public int TokensOfBlock(int inputLength, int position) => Math.Clamp(inputLength - position * TokensPerBlock, 0, TokensPerBlock);

    // Prefix semantics: a request reuses its longest cached prefix, matchedBlocks full blocks, capped at its input.
    public long HitTokens(int inputLength, int matchedBlocks) => Math.Min((long)matchedBlocks * TokensPerBlock, inputLength);

    public static ReplayTrace Load(string path, int tokensPerBlock, int maxRequests = int.MaxValue)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(maxRequests, 1);
        var requests = new List<(long, int, int, long[])>();
        int line = 0;
        foreach (string text in File.ReadLines(path))
        {
            line++;
            if (string.IsNullOrWhiteSpace(text))
                continue;
            if (requests.Count >= maxRequests)
                break;
            try
            {
                using var doc = JsonDocument.Parse(text);
                var root = doc.RootElement;
                long ts = root.TryGetProperty("timestamp", out var t) ? t.GetInt64() : 0;
                int input = root.GetProperty("input_length").GetInt32();
                int output = root.TryGetProperty("output_length", out var o) ? o.GetInt32() : 0;
                var hashes = root.GetProperty("hash_ids");
                var ids = new long[hashes.GetArrayLength()];
                int k = 0;
                foreach (var h in hashes.EnumerateArray())
                    ids[k++] = h.GetInt64();
                requests.Add((ts, input, output, ids));
            }
            catch (Exception e) when (e is JsonException or KeyNotFoundException or InvalidOperationException or FormatException)
            {
                throw new InvalidDataException($"{path}:{line}: not a Mooncake trace record ({e.Message}).", e);
            }
        }
        return new ReplayTrace(tokensPerBlock, requests);
    }
}
