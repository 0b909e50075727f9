using System.Buffers;
using System.Collections.Concurrent;
using System.Globalization;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // While searching past something that is not a record (a torn write, never-written space), the scan reads this much at a time.
    private const int ScanWindowBytes = 1 << 20;
    private const int RecoveryReadAttempts = 3;

    // A block's record (Cancels -1), or a tombstone sector cancelling its key's copies up to Cancels.
    private readonly record struct Found(BlockKey Key, Entry Entry, long Cancels);

    // Rebuilds the index: the committed tombstones say, per key, up to which data address its copies are cancelled; a scan
    // of every data segment finds the sealed records; each key's newest uncancelled copy whose payload verifies is live
    // (an older copy is used when a newer one was torn: compaction's copy under way at a crash).
    // Runs once, from OpenAsync, before the store is handed out; starts the committer at the end.
    private async Task RecoverAsync()
    {
        var cancelledUpTo = new Dictionary<BlockKey, long>();
        int corrupt = ReplayTombstones(cancelledUpTo);
        long settled = ReadMark();
        var (found, tail) = await ScanDataSegmentsAsync().ConfigureAwait(false);
        // Tombstone sectors (written while the log's file system was full) cancel as the log's tombstones do.
        foreach (var f in found.Where(f => f.Cancels >= 0))
        {
            cancelledUpTo[f.Key] = Math.Max(cancelledUpTo.GetValueOrDefault(f.Key, -1), f.Cancels);
            RecoveredTombstoneSectors++;
        }
        // New records go past the mark: one placed below it could be torn by a crash before the next mark, and be trusted.
        tail = Math.Max(tail, settled);
        // New records also go past every address a tombstone cancels: a record there would be cancelled at the next open.
        // (The segment of such an address may be gone, or its copy never landed: a removal during compaction's copy.)
        foreach (long cancelled in cancelledUpTo.Values)
            tail = Math.Max(tail, cancelled + SsdRecordHeader.SectorSize);
        var copies = found.Where(f => f.Cancels < 0 && f.Entry.Address > cancelledUpTo.GetValueOrDefault(f.Key, -1))
            .GroupBy(f => f.Key)
            .ToDictionary(g => g.Key, g => new Queue<Entry>(g.Select(f => f.Entry).OrderByDescending(e => e.Address)));
        var (bad, incomplete, unreadable) = await VerifyRecoveredCopiesAsync(copies, _options.VerifyAllOnOpen ? 0 : settled).ConfigureAwait(false);
        corrupt += bad;
        // New records go past every sealed record found (live, cancelled or torn in its payload): nothing that could be
        // read as a record again is ever overwritten. Never-written or torn space past the last one is reused.
        _dataTail = tail;
        _dataBegin = _index.Count == 0 ? tail & ~(_options.SegmentBytes - 1) : _index.Values.Min(e => e.Address) & ~(_options.SegmentBytes - 1);
        // Segments below the oldest live record (a crash after compaction's copies, before it retired them) and segments
        // past the tail's (preallocated, nothing sealed in them) hold nothing live: retire them (kept as spares).
        var retired = DataSegmentsOnDisk().Where(s => s < DataSegment(_dataBegin) || s > DataSegment(Math.Max(tail - 1, 0))).ToList();
        if (retired.Count > 0)
            await _data.RetireSegmentsAsync(retired).ConfigureAwait(false);
        foreach (var entry in _index.Values)
            _used += entry.StoredLength;
        _liveDataBytes = _index.Values.Sum(e => (long)e.DataLength);
        var recovered = new KeyValuePair<BlockKey, BlockMeta>[_index.Count];
        int i = 0;
        foreach (var (key, entry) in _index)
            recovered[i++] = new(key, entry.Meta);
        (RecoveredCorruptRecords, RecoveredIncompleteWrites, RecoveredUnreadable, _recovered) = (corrupt, incomplete, unreadable, recovered);
        _durableLogAddress = _log.TailAddress; // the log was recovered to its newest commit
        _committer = Task.Run(CommitLoopAsync);
        _markLoop = Task.Run(MarkLoopAsync);
    }

    // The committed log: tombstones, each cancelling its key's copies up to the data address it names. (Tombstone sectors
    // in the data segments are found by the scan.)
    private int ReplayTombstones(Dictionary<BlockKey, long> cancelledUpTo)
    {
        int corrupt = 0;
        long end = _log.TailAddress;
        if (end <= _log.BeginAddress)
            return 0;
        using var iterator = _log.Scan(_log.BeginAddress, end);
        while (iterator.GetNext(MemoryPool<byte>.Shared, out var owner, out int length, out long address, out _))
        {
            using (owner)
            {
                if (SsdRecordHeader.TryParseTombstone(owner.Memory.Span[..length], out long dataAddress, out _) is { } tombstone)
                {
                    cancelledUpTo[tombstone.Key] = Math.Max(cancelledUpTo.GetValueOrDefault(tombstone.Key, -1), dataAddress);
                    _tombstones.Enqueue(new(address, tombstone.Key, dataAddress, _tombstoneSeq++));
                }
                else
                    corrupt++;
            }
            if (iterator.NextAddress >= end)
                break;
        }
        return corrupt;
    }

    private int[] DataSegmentsOnDisk()
    {
        string prefix = Path.GetFileName(_data.FileName) + ".";
        return System.IO.Directory.EnumerateFiles(Directory, prefix + "*")
            .Select(f => int.TryParse(Path.GetFileName(f).AsSpan(prefix.Length), NumberStyles.None, CultureInfo.InvariantCulture, out int n) ? n : -1)
            .Where(n => n >= 0).Order().ToArray();
    }

    // Every data segment, front to back: a sealed header sector at the expected place is a record (the scan then jumps
    // past its payload and reads the next sector); anything else (never written, torn) is searched through a window at a
    // time for the next sealed sector. Segments are scanned eight at a time (records never straddle one). A read the device
    // keeps failing fails the open: a segment that cannot be scanned may hold acknowledged blocks, and nothing is changed
    // on disk before the scan has finished.
    private async Task<(List<Found> Found, long Tail)> ScanDataSegmentsAsync()
    {
        int[] segments = DataSegmentsOnDisk();
        var perSegment = new (List<Found> Found, long Tail)[segments.Length];
        await Parallel.ForEachAsync(Enumerable.Range(0, segments.Length), new ParallelOptions { MaxDegreeOfParallelism = 8 }, async (i, _) =>
        {
            using var buffer = _data.RentBuffer(ScanWindowBytes);
            perSegment[i] = await ScanSegmentAsync(segments[i], buffer).ConfigureAwait(false);
        }).ConfigureAwait(false);
        return (perSegment.SelectMany(s => s.Found).ToList(), perSegment.Select(s => s.Tail).DefaultIfEmpty(0).Max());
    }

    private async Task<(List<Found> Found, long Tail)> ScanSegmentAsync(int segment, DirectFileDevice.AlignedBuffer buffer)
    {
        var found = new List<Found>();
        long tail = 0;
        long start = (long)segment * _options.SegmentBytes, end = start + _options.SegmentBytes;
        long position = start;
        bool expectRecord = true;
        while (position < end)
        {
            int window = (int)Math.Min(expectRecord ? SsdRecordHeader.SectorSize : ScanWindowBytes, end - position);
            await ReadForRecoveryAsync(segment, position - start, buffer, window).ConfigureAwait(false);
            expectRecord = false;
            long next = position + window;
            for (int at = 0; at < window; at += SsdRecordHeader.SectorSize)
            {
                var sector = buffer.Span(at, SsdRecordHeader.SectorSize);
                if (!SsdRecordHeader.MayBeSector(sector)
                    || SsdRecordHeader.TryParseSector(sector, position + at, _storeKey, out ulong checksum, out long cancels, out _) is not { } header)
                    continue;
                var entry = new Entry(position + at, header.StoredLength, header.Codec, header.Meta, checksum);
                if (entry.Address + entry.DataLength > end)
                    continue; // a record never straddles a segment
                found.Add(new Found(header.Key, entry, cancels)); // a tombstone sector is one sector: the next follows it
                tail = Math.Max(tail, entry.Address + entry.DataLength);
                next = entry.Address + entry.DataLength; // the next sector read starts right after it
                expectRecord = true;
                break;
            }
            position = next;
        }
        return (found, tail);
    }

    // A copy that failed verification keeps its sealed header on disk: once the settled mark has passed it, a later open
    // would take it from that header, and prefer it to an older good copy of its key (compaction's copy torn at a crash).
    // Its header sector is zeroed, so it is never a record again; where that write fails, the mark stays below it.
    private async Task UnsealAsync(List<Entry> failedCopies)
    {
        if (failedCopies.Count == 0)
            return;
        using var zeros = _data.RentBuffer(SsdRecordHeader.SectorSize);
        zeros.WritableSpan(0, SsdRecordHeader.SectorSize).Clear();
        foreach (var entry in failedCopies)
        {
            try
            {
                await _data.WriteAlignedAsync(DataSegment(entry.Address), DataOffset(entry.Address), zeros, SsdRecordHeader.SectorSize).ConfigureAwait(false);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                lock (_lock)
                    WriteFailedLocked(entry.Address);
            }
        }
    }

    private async Task ReadForRecoveryAsync(int segment, long offset, DirectFileDevice.AlignedBuffer buffer, int length)
    {
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                await _data.ReadAlignedAsync(segment, offset, buffer, length, scan: true).ConfigureAwait(false);
                return;
            }
            catch (IOException) when (attempt < RecoveryReadAttempts)
            {
                await Task.Delay(10 * attempt).ConfigureAwait(false);
            }
            catch (IOException e)
            {
                throw new TierException($"The SSD tier in {Directory} cannot be opened: reading {_data.FileName}.{segment} at offset {offset} failed "
                    + $"{RecoveryReadAttempts} times ({e.Message}). Nothing was changed on disk; check the device and open the tier again.", e);
            }
        }
    }

    // Takes each key's newest copy: below the settled mark as its sealed header says (it was written whole), at or above
    // it only once its payload verifies, eight reads at a time; a key whose copy fails tries its next older one. A read the
    // device fails is tried again (a transient error must not cost a block); one that keeps failing leaves the copy
    // indexed and unverified, as a failed read does at run time, so a bad moment of the device at start-up loses nothing:
    // every later read of the block verifies it.
    private async Task<(int Corrupt, int Incomplete, (int Blocks, string? FirstError) Unreadable)> VerifyRecoveredCopiesAsync(
        Dictionary<BlockKey, Queue<Entry>> copies, long settled)
    {
        int corrupt = 0, incomplete = 0, verified = 0;
        var failedCopies = new List<Entry>();
        var unreadable = new ConcurrentQueue<string>();
        var unverified = new ConcurrentBag<(BlockKey Key, Entry Entry)>();
        var round = copies.Select(kv => (kv.Key, Entry: kv.Value.Dequeue())).OrderBy(c => c.Entry.Address).ToList();
        while (round.Count > 0)
        {
            foreach (var (key, entry) in round.Where(c => c.Entry.Address + c.Entry.DataLength <= settled))
                _index[key] = entry;
            round.RemoveAll(c => c.Entry.Address + c.Entry.DataLength <= settled);
            verified += round.Count;
            var failed = new ConcurrentBag<(BlockKey Key, bool Unwritten)>();
            await Parallel.ForEachAsync(round, new ParallelOptions { MaxDegreeOfParallelism = 8 }, async (copy, _) =>
            {
                for (int attempt = 1; ; attempt++)
                {
                    try
                    {
                        var (problem, unwritten) = await ReadDataAsync(copy.Key, copy.Entry, default, verifyOnly: true).ConfigureAwait(false);
                        if (problem.Length > 0)
                            failed.Add((copy.Key, unwritten));
                        return;
                    }
                    catch (IOException) when (attempt < RecoveryReadAttempts)
                    {
                        await Task.Delay(10 * attempt).ConfigureAwait(false);
                    }
                    catch (IOException e)
                    {
                        unreadable.Enqueue($"block {copy.Key} at data address {copy.Entry.Address} ({_data.FileName}.{DataSegment(copy.Entry.Address)}): {e.Message}");
                        unverified.Add(copy);
                        return;
                    }
                }
            }).ConfigureAwait(false);
            var bad = failed.ToDictionary(f => f.Key, f => f.Unwritten);
            var next = new List<(BlockKey, Entry)>();
            foreach (var (key, entry) in round)
            {
                if (!bad.TryGetValue(key, out bool unwritten))
                {
                    _index[key] = entry;
                    continue;
                }
                failedCopies.Add(entry);
                if (unwritten)
                    incomplete++;
                else
                    corrupt++;
                if (copies[key].TryDequeue(out var older))
                    next.Add((key, older));
            }
            round = next;
        }
        foreach (var (key, entry) in unverified)
        {
            _index[key] = entry;
            // Not verified, so possibly torn (compaction's copy under way at a crash, shadowing the intact original): it
            // holds the mark below it, as a failed write does, so that the next open verifies it instead of trusting it.
            if (entry.Address + entry.DataLength > _markedBelow)
            {
                lock (_lock)
                    WriteFailedLocked(entry.Address);
            }
        }
        RecoveredVerifiedPayloads = verified;
        await UnsealAsync(failedCopies).ConfigureAwait(false);
        return (corrupt, incomplete, (unreadable.Count, unreadable.TryPeek(out string? first) ? first : null));
    }
}
