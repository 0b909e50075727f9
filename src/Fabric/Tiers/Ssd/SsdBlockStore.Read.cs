using System.Buffers;
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
            IMemoryOwner<byte>? owner = null;
            try
            {
                int length;
                try
                {
                    (owner, length) = await _log.ReadAsync(entry.Address, MemoryPool<byte>.Shared, entry.RecordLength, cancellationToken).ConfigureAwait(false);
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
                    throw new TierException($"Reading block {key} from the SSD tier in {Directory} failed ({e.Message}); check the device. "
                        + "The block stays indexed; a later read may succeed.", e);
                }
                problem = owner is null ? "the log returned no record" : Decode(key, entry, owner.Memory.Span[..length], destination.Span);
                if (problem.Length == 0)
                    return true;
            }
            finally
            {
                owner?.Dispose();
            }
            // A bad record: unless compaction moved the block meanwhile (then read the new copy), drop it.
            lock (_lock)
            {
                if (_index.TryGetValue(key, out var now) && now != entry)
                {
                    entry = now;
                    continue;
                }
                if (now == entry)
                    DropLocked(key, entry);
            }
            Signal();
            throw new BlockCorruptException(key, TierKind.Ssd, $"record at log address {entry.Address} in {Directory}: {problem}");
        }
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

    private static string Decode(BlockKey key, Entry entry, ReadOnlySpan<byte> record, Span<byte> destination)
    {
        if (record.Length != entry.RecordLength)
            return $"record is {record.Length} bytes, the index expects {entry.RecordLength}";
        if (SsdRecordHeader.TryParse(record, out string problem) is not { } header)
            return problem;
        if (header.Kind != SsdRecordKind.Block || header.Key != key || header.Meta != entry.Meta || header.Codec != entry.Codec)
            return $"record holds {header.Kind} {header.Key} ({header.Meta}), not the indexed block";
        var payload = record[SsdRecordHeader.Size..];
        var target = destination[..header.RawLength];
        if (header.Codec == SsdCodec.None)
        {
            payload.CopyTo(target);
            return "";
        }
        try
        {
            int n = Zstd.Decompress(payload, target);
            return n == header.RawLength ? "" : $"zstd produced {n} bytes, expected {header.RawLength}";
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
        _liveRecordBytes -= entry.RecordLength;
        if (_fault is not null)
            return;
        var header = SsdRecordHeader.Tombstone(key);
        var bytes = new SsdHeaderBytes();
        header.Write(bytes, default);
        try
        {
            _log.Enqueue(new SsdLogEntry(bytes, default));
            _dirty = true;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            _fault ??= e;
        }
    }
}
