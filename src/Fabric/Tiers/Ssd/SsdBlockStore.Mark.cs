using System.Buffers.Binary;
using KvFabric.Transfer;

namespace KvFabric.Tiers.Ssd;

public sealed partial class SsdBlockStore
{
    // The settled mark: a data address below which every record written was written whole (its O_DSYNC write completed).
    // Only records at or above it can be torn by a crash, so opening reads and verifies only their payloads and takes the
    // records below from their sealed header sectors: recovery reads 4 KiB per block instead of the whole block. Kept
    // in its own slot file, rewritten at most once per SettledMarkInterval while it moves, and at a clean close. Every
    // read still verifies its block's checksum (a bit flipped at rest is caught there, or by VerifyAllOnOpen).
    private const string MarkFileName = "settled.slots";
    private const uint MarkMagic = 0x4B4D5653; // "SVMK"

    private readonly SsdSlotFile _markFile;
    private long _markNumber;
    private long _markedBelow;                       // the last mark written (or read at open)
    // Records whose write failed after it was issued (under _lock): each holds the mark below it until compaction retires
    // its segment (a full disk no longer stops writes, so one failure must not hold the mark for the process's life).
    private readonly SortedSet<long> _failedWrites = new();
    private Task _markLoop = Task.CompletedTask;
    private readonly CancellationTokenSource _markStop = new();

    /// <summary>Tests: the last settled mark written (or read at open).</summary>
    internal long MarkedBelow => Volatile.Read(ref _markedBelow);

    /// <summary>The last error writing the settled mark, if any (opening then verifies more payloads; nothing is lost).</summary>
    public string? LastMarkError { get; private set; }

    // Under _lock: every record starting below this was written whole. Records are placed in address order; one still
    // being written, or one whose issued write failed (it may be torn), holds the mark at its address.
    private long SettledBelowLocked() =>
        Math.Min(_dataInFlight.Count > 0 ? _dataInFlight.Min : _dataTail, _failedWrites.Count > 0 ? _failedWrites.Min : long.MaxValue);

    // Under _lock: a record's write was issued and did not complete: it may be partly on disk.
    private void WriteFailedLocked(long dataAddress) => _failedWrites.Add(dataAddress);

    // Under _lock: the data segments below begin are retired, and with them every failed record in them (addresses are
    // never reused, and a header is sealed for its address, so nothing left in a reused file can be read as a record).
    private void SegmentsRetiredLocked(long begin) => _failedWrites.RemoveWhere(a => a < begin);

    // The mark read at open: 0 (verify everything) when there is none, or it belongs to another directory's store.
    private long ReadMark()
    {
        // Numbered past every slot, valid for this store or not: a slot the store ignores (another directory's mark, with
        // higher numbers) must not stay the newest, or every later open ignores this store's own marks and verifies all.
        _markNumber = _markFile.Slots.Select(s => s.Number).DefaultIfEmpty(0).Max();
        if (_markFile.Slots is not [var newest, ..] || newest.Content.Length != 16)
            return 0;
        long below = BinaryPrimitives.ReadInt64LittleEndian(newest.Content);
        if (below < 0 || BinaryPrimitives.ReadUInt64LittleEndian(newest.Content.AsSpan(8)) != Checksums.XxHash3(newest.Content.AsSpan(0, 8), _storeKey))
            return 0;
        return _markedBelow = below;
    }

    private async Task MarkLoopAsync()
    {
        using var timer = new PeriodicTimer(_options.SettledMarkInterval);
        try
        {
            while (await timer.WaitForNextTickAsync(_markStop.Token).ConfigureAwait(false))
                WriteMark();
        }
        catch (OperationCanceledException)
        {
        }
    }

    // Writes the mark when it has moved (one 4 KiB O_DSYNC write). Called by the mark loop, and once more at close after
    // the loop has ended, so never twice at once. A failure is remembered, not thrown: the mark only saves work at open.
    private void WriteMark()
    {
        long below;
        lock (_lock)
            below = SettledBelowLocked();
        // Lower than the last mark only when a copy below it failed at open and could not be unsealed (a scrub with
        // VerifyAllOnOpen): the mark then moves down, so that the next open verifies that copy again.
        if (below == _markedBelow)
            return;
        Span<byte> content = stackalloc byte[16];
        BinaryPrimitives.WriteInt64LittleEndian(content, below);
        BinaryPrimitives.WriteUInt64LittleEndian(content[8..], Checksums.XxHash3(content[..8], _storeKey));
        try
        {
            _markFile.Write(++_markNumber, content);
            _markedBelow = below;
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            LastMarkError = $"writing {_markFile.Path} failed: {e.Message}";
        }
    }

    private async Task StopMarkAsync()
    {
        _markStop.Cancel();
        await _markLoop.ConfigureAwait(false);
        WriteMark();
        _markFile.Dispose();
        _markStop.Dispose();
    }
}
