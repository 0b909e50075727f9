using System.Buffers;
using System.IO.Pipelines;
using BenchmarkDotNet.Attributes;
using Google.Protobuf;
using KvFabric.Blocks;
using KvFabric.Client.Grpc;
using KvFabric.Index;
using KvFabric.Memory;
using KvFabric.Rpc.V1;
using KvFabric.Tiers;

namespace KvFabric.Bench.Micro;

/// <summary>The chained block hash over a 32-block prompt of 256-token blocks (8192 tokens), one call per operation.</summary>
[MemoryDiagnoser]
public class BlockHashing
{
    private readonly int[] _tokens = new int[32 * 256];
    private readonly BlockHash[] _chain = new BlockHash[32];
    private BlockHash _root;

    [GlobalSetup]
    public void Setup()
    {
        var rng = new Random(7);
        for (int i = 0; i < _tokens.Length; i++)
            _tokens[i] = rng.Next(0, 128_000);
        _root = BlockHasher.Root("bench", new KvLayout("llama-3-8b", 32, 8, 128, KvDType.BF16, 256));
    }

    [Benchmark(Description = "BlockHasher.ComputeChain 32 x 256 tokens")]
    public int ComputeChain() => BlockHasher.ComputeChain(_root, 256, _tokens, _chain);

    [Benchmark(Description = "BlockHasher.Next one 256-token block")]
    public BlockHash Next() => BlockHasher.Next(_root, _tokens.AsSpan(0, 256));
}

/// <summary>
/// gRPC framing: one LookupRequest (32 hashes) written and flushed into a Pipe, then read back. The methods return
/// ValueTask so that the harness itself allocates nothing when the pipe completes synchronously (a Task&lt;T&gt; would).
/// </summary>
[MemoryDiagnoser]
public class GrpcFramingRoundTrip
{
    private static readonly object Decoded = new();
    private static readonly Func<ReadOnlySequence<byte>, object> Discard = _ => Decoded;
    private readonly Pipe _pipe = new(new PipeOptions(pauseWriterThreshold: 0, useSynchronizationContext: false));
    private readonly LookupRequest _message = new() { Hashes = ByteString.CopyFrom(new byte[32 * 16]) };

    [Benchmark(Description = "GrpcFraming.Write + flush + ReadAsync (decode callback)")]
    public async ValueTask<object?> WriteRead()
    {
        await GrpcFraming.WriteAndFlushAsync(_pipe.Writer, _message, CancellationToken.None).ConfigureAwait(false);
        return await GrpcFraming.ReadAsync(_pipe.Reader, Discard, 1 << 20, null, CancellationToken.None).ConfigureAwait(false);
    }

    [Benchmark(Description = "GrpcFraming.Write + flush + ReadAsync (LookupRequest.Parser)")]
    public async ValueTask<LookupRequest?> WriteReadParse()
    {
        await GrpcFraming.WriteAndFlushAsync(_pipe.Writer, _message, CancellationToken.None).ConfigureAwait(false);
        return await GrpcFraming.ReadAsync(_pipe.Reader, LookupRequest.Parser, 1 << 20, null, CancellationToken.None).ConfigureAwait(false);
    }
}

/// <summary>HostBlockPool: rent one slot and return it.</summary>
[MemoryDiagnoser]
public class HostBlockPoolRentReturn
{
    private HostBlockPool? _pool;

    [GlobalSetup]
    public void Setup() => _pool = new HostBlockPool(new HostBlockPoolOptions { SlotBytes = 64 << 10, SlotCount = 64 });

    [GlobalCleanup]
    public void Cleanup() => _pool?.Dispose();

    [Benchmark(Description = "HostBlockPool.Rent + Return")]
    public int RentReturn()
    {
        var slot = _pool!.Rent();
        _pool.Return(slot);
        return slot.Index;
    }
}

/// <summary>
/// RadixTree: Apply stores (then removes) one 64-block chain for one worker over a tree of 100k blocks held by 16
/// workers; Match walks a 1024-block prompt held by 3 workers.
/// </summary>
[MemoryDiagnoser]
public class RadixTreeApplyMatch
{
    private RadixTree? _tree;
    private readonly List<MatchResult> _output = new(64);
    private BlockHash[] _event = [];
    private BlockHash[] _prompt = [];

    [GlobalSetup]
    public void Setup()
    {
        _tree = new RadixTree(1 << 18);
        ulong n = 1;
        BlockHash[] Chain(int length)
        {
            var c = new BlockHash[length];
            for (int i = 0; i < length; i++, n++)
                c[i] = new BlockHash(Mix(n), Mix(n ^ 0xD1B54A32D192ED03UL)); // uniform, like SHA-256 prefixes
            return c;
        }
        for (int i = 0; i < 1000; i++)
            _tree.ApplyStored(i % 16, null, Chain(100), TierKind.Host);
        _prompt = Chain(1024);
        for (int w = 0; w < 3; w++)
            _tree.ApplyStored(w, null, _prompt, TierKind.Gpu);
        _event = Chain(64);
        _tree.Match(_prompt, _output); // grows this thread's scratch
    }

    [GlobalCleanup]
    public void Cleanup() => _tree?.Dispose();

    private static ulong Mix(ulong z)
    {
        z += 0x9E3779B97F4A7C15UL;
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9UL;
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBUL;
        return z ^ (z >> 31);
    }

    [Benchmark(Description = "RadixTree.ApplyStored + ApplyRemoved, 64 blocks")]
    public int ApplyStoredRemoved()
    {
        _tree!.ApplyStored(20, null, _event, TierKind.Gpu);
        return _tree.ApplyRemoved(20, _event, TierKind.Gpu);
    }

    [Benchmark(Description = "RadixTree.Match 1024 blocks, 3 holders")]
    public int Match() => _tree!.Match(_prompt, _output);
}
