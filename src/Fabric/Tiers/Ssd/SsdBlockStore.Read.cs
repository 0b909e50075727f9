using KvFabric.Compression;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    /// <summary>
    /// Reads and verifies a block. A record that fails its checksum is dropped and reported as <see cref="BlockCorruptException"/>;
    /// a block moved by compaction while being read is read again from its new place.
    /// </summary>
    public async ValueTask<bool> ReadAsync(BlockKey key, Memory<byte> destination, CancellationToken cancellationToken = default)
    {
        ThrowIfDisposed();
        Entry entry;
        lock (_lock)
        {
            if (!_index.TryGetValue(key, out entry))
                return false;
        }
        if (destination.Length < entry.Meta.Length)
            throw new ArgumentException($"Destination of {destination.Length} bytes is too small for block {key} ({entry.Meta.Length} bytes); "
                + "pass a buffer of at least the block's length.", nameof(destination));

        while (true)
        {
            string problem;
            try
            {
                cancellationToken.ThrowIfCancellationRequested();
                problem = await ReadDataAsync(key, entry, destination, verifyOnly: false).ConfigureAwait(false);
                if (problem.Length == 0)
                    return true;
            }
            catch (Exception e) when (e is not OperationCanceledException)
            {
                if (Moved(key, entry, out var now))
                {
                    if (now is not { } next)
                        return false;
                    entry = next;
                    continue;
                }
                throw new TierException($"Reading block {key} from the SSD tier in {Directory} failed ({DeviceError(e)}); check the device. "
                    + "The block stays indexed; a later read may succeed.", e);
            }
            // A bad record: unless compaction moved the block meanwhile (then read the new copy), drop it.
            lock (_lock)
            {
                if (!_index.TryGetValue(key, out var now))
                    return false; // removed meanwhile
                if (now != entry)
                {
                    entry = now;
                    continue;
                }
                DropLocked(key, entry);
            }
            Signal();
            throw new BlockCorruptException(key, TierKind.Ssd, $"payload at data address {entry.Address} ({_data.FileName}.{DataSegment(entry.Address)}, "
                + $"offset {DataOffset(entry.Address)}) in {Directory}: {problem}");
        }
    }

    // One aligned pread of the payload from its data segment into a pooled buffer, verified in place against the indexed
    // header's checksum, then copied or decompressed into the destination. Returns "" or what was wrong.
    private async ValueTask<string> ReadDataAsync(BlockKey key, Entry entry, Memory<byte> destination, bool verifyOnly)
    {
        int length = entry.DataLength;
        using var buffer = _data.RentBuffer(length);
        await _data.ReadAlignedAsync(DataSegment(entry.Address), DataOffset(entry.Address), buffer, length).ConfigureAwait(false);
        var payload = buffer.Span(0, entry.StoredLength);
        ulong actual = entry.Header(key).ChecksumOf(payload);
        if (actual != entry.Checksum)
            return $"XXH3 checksum 0x{actual:x16} does not match the indexed 0x{entry.Checksum:x16}";
        return verifyOnly ? "" : Decode(entry, payload, destination.Span);
    }

    private bool Moved(BlockKey key, Entry entry, out Entry? now)
    {
        lock (_lock)
        {
            if (!_index.TryGetValue(key, out var current))
            {
                now = null;
                return true;
            }
            now = current;
            return current != entry;
        }
    }

    private static string Decode(Entry entry, ReadOnlySpan<byte> payload, Span<byte> destination)
    {
        var target = destination[..entry.Meta.Length];
        if (entry.Codec == SsdCodec.None)
        {
            payload.CopyTo(target);
            return "";
        }
        try
        {
            int n = Zstd.Decompress(payload, target);
            return n == entry.Meta.Length ? "" : $"zstd produced {n} bytes, expected {entry.Meta.Length}";
        }
        catch (InvalidDataException e)
        {
            return e.Message;
        }
    }

    /// <summary>
    /// Removes a block: it is gone from this process at once, and a tombstone record makes the removal durable at the next
    /// group commit (started right away). A crash before that commit can bring the block back, intact.
    /// </summary>
    public bool Remove(BlockKey key)
    {
        ThrowIfDisposed();
        lock (_lock)
        {
            if (!_index.TryGetValue(key, out var entry))
                return false;
            DropLocked(key, entry);
        }
        Signal();
        return true;
    }

    // Under _lock. The tombstone is appended inside the lock so that it is ordered after the record it cancels and before
    // any later write of the same key (which can only start once the key is gone from the index).
    private void DropLocked(BlockKey key, Entry entry)
    {
        _index.Remove(key);
        _used -= entry.StoredLength;
        _liveDataBytes -= entry.DataLength;
        if (_fault is not null)
            return;
        var header = SsdRecordHeader.Tombstone(key);
        var bytes = new SsdHeaderBytes();
        header.Write(bytes, ReadOnlySpan<byte>.Empty);
        try
        {
            _log.Enqueue(new SsdLogEntry(bytes));
            _dirty = true;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            _fault ??= e;
        }
    }
}
