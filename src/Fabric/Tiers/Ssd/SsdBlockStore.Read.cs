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
                (problem, _) = await ReadDataAsync(key, entry, destination, verifyOnly: false).ConfigureAwait(false);
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
                // Disposed while this read was under way: the committer may have ended and the log may be closed (FASTER
                // would write the tombstone into pages it has freed). Checked under the lock, as Remove does; the bytes
                // are not served either way.
                ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);
                DropLocked(key, entry);
            }
            Signal();
            throw new BlockCorruptException(key, TierKind.Ssd, $"record at data address {entry.Address} ({_data.FileName}.{DataSegment(entry.Address)}, "
                + $"offset {DataOffset(entry.Address)}) in {Directory}: {problem}");
        }
    }

    // One aligned pread of the payload (behind its header sector) into a pooled buffer, verified in place against the
    // indexed header's checksum, then copied or decompressed into the destination. Returns "" or what was wrong, and
    // whether the payload has a sector of zeros: preallocated space reads as zeros until written, so a record whose write
    // was under way at a crash shows them (a flipped bit does not).
    private async ValueTask<(string Problem, bool Unwritten)> ReadDataAsync(BlockKey key, Entry entry, Memory<byte> destination, bool verifyOnly)
    {
        int length = DataBytes(entry.StoredLength);
        using var buffer = _data.RentBuffer(length);
        await _data.ReadAlignedAsync(DataSegment(entry.PayloadAddress), DataOffset(entry.PayloadAddress), buffer, length).ConfigureAwait(false);
        var payload = buffer.Span(0, entry.StoredLength);
        ulong actual = entry.Header(key).ChecksumOf(payload);
        if (actual != entry.Checksum)
            return ($"XXH3 checksum 0x{actual:x16} does not match the indexed 0x{entry.Checksum:x16}", HasZeroSector(buffer.Span(0, length)));
        return (verifyOnly ? "" : Decode(entry, payload, destination.Span), false);
    }

    private static bool HasZeroSector(ReadOnlySpan<byte> data)
    {
        for (int at = 0; at + (int)SectorBytes <= data.Length; at += (int)SectorBytes)
        {
            if (!data.Slice(at, (int)SectorBytes).ContainsAnyExcept((byte)0))
                return true;
        }
        return false;
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
    /// group commit (started right away). A crash before that commit can bring the block back, intact. While the log's
    /// file system is full, the committer writes the tombstone as a sealed sector at the data tail instead, durable once
    /// that write completes; <see cref="RemovalsNotDurable"/> counts the removals durable neither way yet.
    /// </summary>
    public bool Remove(BlockKey key)
    {
        ThrowIfDisposed();
        lock (_lock)
        {
            // Again under the lock: a tombstone appended after the committer's last round would never be committed.
            ThrowIfDisposed();
            if (!_index.TryGetValue(key, out var entry))
                return false;
            DropLocked(key, entry);
        }
        Signal();
        MaybeStartCompaction();
        return true;
    }

    // Under _lock. The tombstone cancels every copy of the key up to the newest data address it has: the entry's, or the
    // copy compaction is writing right now. A later write of the key (which can only start once the key is gone from the
    // index) gets a higher data address, so the tombstone never cancels it.
    private void DropLocked(BlockKey key, Entry entry)
    {
        _index.Remove(key);
        // Compaction's failed reads count against this record only: the key written again is a new record.
        _compactionReadFailures.Remove(key);
        _used -= entry.StoredLength;
        _liveDataBytes -= entry.DataLength;
        long upTo = _copying is { } copy && copy.Key == key ? Math.Max(entry.Address, copy.To) : entry.Address;
        AppendTombstoneLocked(key, upTo);
    }

    private static SsdLogEntry TombstoneEntry(BlockKey key, long upTo)
    {
        var bytes = new SsdTombstoneBytes();
        SsdRecordHeader.WriteTombstone(bytes, key, upTo);
        return new SsdLogEntry(bytes);
    }

    private void AppendTombstoneLocked(BlockKey key, long upTo)
    {
        if (_logFault is not null)
        {
            _removalsAfterLogFault++; // the log failed (a device error): this removal is not durable until a reopen
            return;
        }
        if (_logPaused)
        {
            // The log's file system was full: the tombstone waits here, and is appended when the log is reopened; the
            // committer writes it as a tombstone sector meanwhile (SsdBlockStore.TombstoneSectors.cs).
            var waiting = new Tombstone(NotAppended, key, upTo, _tombstoneSeq++);
            _tombstones.Enqueue(waiting);
            _awaitingSector.Enqueue(waiting);
            _dirty = true;
            return;
        }
        try
        {
            long logAddress = _log.Enqueue(TombstoneEntry(key, upTo));
            _tombstones.Enqueue(new(logAddress, key, upTo, _tombstoneSeq++));
            _dirty = true;
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            _logFault ??= e;
            _fault ??= e;
        }
    }
}
