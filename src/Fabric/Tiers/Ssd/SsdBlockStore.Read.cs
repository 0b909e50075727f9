using System.Buffers;
using System.Buffers.Binary;
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
                problem = await ReadRecordAsync(entry, key, destination, cancellationToken).ConfigureAwait(false);
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
            throw new BlockCorruptException(key, TierKind.Ssd, $"record at log address {entry.Address} in {Directory}: {problem}");
        }
    }

    // Flushed records are read straight from their segment file (one aligned pread, verified in place); records still
    // only in FASTER's memory tail go through FasterLog.ReadAsync. Returns "" or what was wrong with the record.
    private async ValueTask<string> ReadRecordAsync(Entry entry, BlockKey key, Memory<byte> destination, CancellationToken cancellationToken)
    {
        int header = _log.HeaderSize;
        if (_device is DirectFileDevice direct && entry.Address + header + entry.RecordLength <= _log.FlushedUntilAddress)
        {
            int segment = (int)(entry.Address / _options.SegmentBytes);
            long offset = entry.Address % _options.SegmentBytes;
            long start = offset & ~(long)(SectorBytes - 1);
            int length = (int)((offset - start + header + entry.RecordLength + SectorBytes - 1) & ~(long)(SectorBytes - 1));
            using var buffer = direct.RentBuffer(length);
            await direct.ReadAlignedAsync(segment, start, buffer, length).ConfigureAwait(false);
            var raw = buffer.Span((int)(offset - start), header + entry.RecordLength);
            // FASTER's entry header is the payload length (LogChecksumType.None); the record's own checksum covers the rest.
            int logged = BinaryPrimitives.ReadInt32LittleEndian(raw);
            return logged == entry.RecordLength ? Decode(key, entry, raw[header..], destination.Span)
                : $"log entry length {logged} at address {entry.Address}, the index expects {entry.RecordLength}";
        }
        var (owner, read) = await _log.ReadAsync(entry.Address, MemoryPool<byte>.Shared, entry.RecordLength, cancellationToken).ConfigureAwait(false);
        using (owner)
            return owner is null ? "the log returned no record" : Decode(key, entry, owner.Memory.Span[..read], destination.Span);
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
