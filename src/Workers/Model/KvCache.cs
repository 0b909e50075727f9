using KvFabric.Blocks;
using KvFabric.Memory;

namespace KvFabric.Workers.Model;

/// <summary>
/// One sequence's KV cache, held as fabric blocks: block i covers token positions [i*T, (i+1)*T) (T = tokens per
/// block) and is exactly <see cref="KvLayout.BlockBytes"/> bytes in the layout's element order
/// ([layer][K,V][token][head][dim], F32), so a full block can be handed to the fabric as it is and a block fetched from
/// the fabric can be used as it is. The last block may be partial (the tail); it is never exported or hashed.
/// Block storage is rented from a <see cref="HostBlockPool"/> as the sequence grows; decode allocates nothing.
/// Not thread-safe; one sequence is driven by one caller at a time.
/// </summary>
public sealed unsafe class KvCache : IDisposable
{
    private readonly HostBlockPool _pool;
    private readonly BlockSlot[] _blocks;
    private readonly int[] _tokens;
    private int _blockCount;
    private int _length;
    private bool _disposed;

    public KvCache(KvLayout layout, HostBlockPool pool, int maxTokens)
    {
        ArgumentNullException.ThrowIfNull(layout);
        ArgumentNullException.ThrowIfNull(pool);
        if (layout.DType != KvDType.F32 || layout.TensorParallelSize != 1)
        {
            throw new ArgumentException($"KvCache holds F32 blocks of one rank; got {layout.Describe()}.", nameof(layout));
        }

        if (pool.SlotBytes != layout.BlockBytes)
        {
            throw new ArgumentException(
                $"The pool's slots are {pool.SlotBytes} bytes but this layout's blocks are {layout.BlockBytes} bytes.", nameof(pool));
        }

        ArgumentOutOfRangeException.ThrowIfNegativeOrZero(maxTokens);
        Layout = layout;
        _pool = pool;
        TokensPerBlock = layout.TokensPerBlock;
        MaxTokens = maxTokens;
        _tokens = new int[maxTokens];
        _blocks = new BlockSlot[(maxTokens + TokensPerBlock - 1) / TokensPerBlock];
        TokenStride = layout.HeadsPerRank * layout.HeadDim;
        KvStride = (long)TokensPerBlock * TokenStride;
    }

    public KvLayout Layout { get; }

    public int TokensPerBlock { get; }

    public int MaxTokens { get; }

    /// <summary>Tokens whose K and V are in the cache (positions 0 to Length - 1).</summary>
    public int Length => _length;

    public int FullBlocks => _length / TokensPerBlock;

    /// <summary>Blocks holding data: the full ones plus a partial tail, if any.</summary>
    public int BlockCount => (_length + TokensPerBlock - 1) / TokensPerBlock;

    public ReadOnlySpan<int> Tokens => _tokens.AsSpan(0, _length);

    // Floats between two tokens of one layer's K (or V) in a block, and between a layer's K slab and its V slab.
    internal int TokenStride { get; }

    internal long KvStride { get; }

    /// <summary>The bytes of a full block, in place (valid until the cache is truncated, cleared or disposed).</summary>
    public ReadOnlySpan<byte> GetBlock(int index)
    {
        CheckFull(index);
        return _blocks[index].AsSpan();
    }

    /// <summary>Where a full block lives in its pool's memory (for a transfer that reads it in place); valid as GetBlock's span is.</summary>
    public nint BlockAddress(int index)
    {
        CheckFull(index);
        return _blocks[index].Address;
    }

    public void ExportBlock(int index, Span<byte> destination)
    {
        CheckFull(index);
        if (destination.Length < Layout.BlockBytes)
        {
            throw new ArgumentException($"A block is {Layout.BlockBytes} bytes; destination has {destination.Length}.", nameof(destination));
        }

        _blocks[index].AsSpan().CopyTo(destination);
    }

    /// <summary>
    /// Puts a full block's bytes (for example fetched from the fabric) into the cache. Appends when
    /// <paramref name="index"/> is the next block and the cache ends on a block boundary; overwrites when the block
    /// is already full and holds the same tokens. <paramref name="blockTokens"/> are the block's token ids, which
    /// the cache needs for hashing and to check later prefills against.
    /// </summary>
    public void ImportBlock(int index, ReadOnlySpan<byte> source, ReadOnlySpan<int> blockTokens)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (source.Length != Layout.BlockBytes)
        {
            throw new ArgumentException($"A block is {Layout.BlockBytes} bytes; source has {source.Length}.", nameof(source));
        }

        if (blockTokens.Length != TokensPerBlock)
        {
            throw new ArgumentException($"A block holds {TokensPerBlock} tokens; got {blockTokens.Length}.", nameof(blockTokens));
        }

        if (index < FullBlocks)
        {
            if (!blockTokens.SequenceEqual(_tokens.AsSpan(index * TokensPerBlock, TokensPerBlock)))
            {
                throw new ArgumentException($"Block {index} already holds different tokens.", nameof(blockTokens));
            }

            source.CopyTo(_blocks[index].AsSpan());
            return;
        }

        if (index != FullBlocks || _length % TokensPerBlock != 0)
        {
            throw new ArgumentOutOfRangeException(
                nameof(index), index, $"Blocks are imported in order: the cache holds {_length} tokens, so the next block to import is {FullBlocks}" +
                (_length % TokensPerBlock != 0 ? " after truncating the partial tail." : "."));
        }

        int end = (index + 1) * TokensPerBlock;
        Reserve(end);
        source.CopyTo(_blocks[index].AsSpan());
        blockTokens.CopyTo(_tokens.AsSpan(index * TokensPerBlock));
        _length = end;
    }

    /// <summary>Where the partial last block lives (positions past the tail are unused); the cache must end mid-block.</summary>
    public nint TailBlockAddress()
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (_length % TokensPerBlock == 0)
        {
            throw new InvalidOperationException($"The cache ends on a block boundary ({_length} tokens): it has no partial tail block.");
        }

        return _blocks[FullBlocks].Address;
    }

    /// <summary>
    /// Appends a partial last block (1 to TokensPerBlock - 1 tokens) from a whole block's bytes, of which only the
    /// tail's positions are meaningful; the cache must end on a block boundary (after its full blocks).
    /// </summary>
    public void ImportTail(ReadOnlySpan<byte> source, ReadOnlySpan<int> tailTokens)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (source.Length != Layout.BlockBytes)
        {
            throw new ArgumentException($"A block is {Layout.BlockBytes} bytes; source has {source.Length}.", nameof(source));
        }

        if (tailTokens.Length is < 1 || tailTokens.Length >= TokensPerBlock)
        {
            throw new ArgumentException($"A tail holds 1 to {TokensPerBlock - 1} tokens; got {tailTokens.Length}.", nameof(tailTokens));
        }

        if (_length % TokensPerBlock != 0)
        {
            throw new InvalidOperationException($"The tail is imported after the full blocks, on a block boundary; the cache holds {_length} tokens.");
        }

        int end = _length + tailTokens.Length;
        Reserve(end);
        source.CopyTo(_blocks[FullBlocks].AsSpan());
        tailTokens.CopyTo(_tokens.AsSpan(_length));
        _length = end;
    }

    /// <summary>
    /// Zero-copy import: appends a full block whose bytes are already in <paramref name="slot"/>, a slot rented from
    /// this cache's pool (for example one a fabric fetch wrote into). The cache takes ownership of the slot and returns
    /// it to the pool when the block is dropped. Same ordering rules as <see cref="ImportBlock"/> when appending.
    /// </summary>
    public void AdoptBlock(BlockSlot slot, ReadOnlySpan<int> blockTokens)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if ((uint)slot.Index >= (uint)_pool.Capacity || _pool.SlotAt(slot.Index).Address != slot.Address)
        {
            throw new ArgumentException($"Slot {slot.Index} does not belong to this cache's pool.", nameof(slot));
        }

        if (blockTokens.Length != TokensPerBlock)
        {
            throw new ArgumentException($"A block holds {TokensPerBlock} tokens; got {blockTokens.Length}.", nameof(blockTokens));
        }

        if (_length % TokensPerBlock != 0 || _length + TokensPerBlock > MaxTokens)
        {
            throw new InvalidOperationException(
                $"A block can be adopted only when the cache ends on a block boundary with room left; it holds {_length} tokens.");
        }

        int index = _length / TokensPerBlock;
        if (_blockCount > index)
        {
            // A spare slot left over from a truncation: give it back, the adopted one takes its place.
            _pool.Return(_blocks[index]);
            _blockCount = index;
        }

        _blocks[_blockCount++] = slot;
        blockTokens.CopyTo(_tokens.AsSpan(_length));
        _length += TokensPerBlock;
    }

    /// <summary>Chained block hashes (spec v1, <see cref="BlockHasher"/>) of the full blocks, root bound to this layout.</summary>
    public int ComputeBlockHashes(string tenantNamespace, Span<BlockHash> destination) =>
        BlockHasher.ComputeChain(tenantNamespace, Layout, _tokens.AsSpan(0, FullBlocks * TokensPerBlock), destination);

    /// <summary>Keeps positions 0 to length - 1 and returns the blocks no longer needed to the pool.</summary>
    public void Truncate(int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        ArgumentOutOfRangeException.ThrowIfNegative(length);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(length, _length);
        int keep = (length + TokensPerBlock - 1) / TokensPerBlock;
        while (_blockCount > keep)
        {
            _pool.Return(_blocks[--_blockCount]);
            _blocks[_blockCount] = default;
        }

        _length = length;
    }

    public void Clear() => Truncate(0);

    public void Dispose()
    {
        // Once, even when two owners race to dispose (the blocks must go back to the pool exactly once).
        if (Interlocked.Exchange(ref _disposing, 1) != 0)
        {
            return;
        }

        Truncate(0);
        _disposed = true;
    }

    private int _disposing;

    // Makes sure blocks exist for positions 0 to length - 1.
    internal void Reserve(int length)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if (length > MaxTokens)
        {
            throw new InvalidOperationException($"This cache holds at most {MaxTokens} tokens; {length} were asked for.");
        }

        int need = (length + TokensPerBlock - 1) / TokensPerBlock;
        while (_blockCount < need)
        {
            // Rented first: when the pool is empty the count must not have moved past a slot that was never filled.
            BlockSlot slot = _pool.Rent();
            _blocks[_blockCount] = slot;
            _blockCount++;
        }
    }

    // Records the tokens of freshly computed positions start to start + tokens.Length - 1 (their K/V already written).
    internal void Commit(ReadOnlySpan<int> tokens, int start)
    {
        tokens.CopyTo(_tokens.AsSpan(start));
        _length = start + tokens.Length;
    }

    // Start of layer `layer`'s K slab (kv = 0) or V slab (kv = 1) in block `block`.
    internal float* Slab(int block, int layer, int kv) =>
        (float*)_blocks[block].Address + (((long)layer * 2) + kv) * KvStride;

    private void CheckFull(int index)
    {
        ObjectDisposedException.ThrowIf(_disposed, this);
        if ((uint)index >= (uint)FullBlocks)
        {
            throw new ArgumentOutOfRangeException(nameof(index), index, $"The cache has {FullBlocks} full blocks ({_length} tokens).");
        }
    }
}
