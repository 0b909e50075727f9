using System.Buffers;
using System.Diagnostics.CodeAnalysis;
using System.Numerics;
using FASTER.core;
using KvFabric.Compression;
using KvFabric.Transfer;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// The crash-safe SSD tier: every block is one self-describing record (a sealed header sector, then the payload) written
/// with one O_DIRECT | O_DSYNC write into a data segment (blocks.data.N), and acknowledged once that write is on stable
/// storage: the same I/O as fio's durable writes, with no commit on the write's path. Removals are tombstones in a FASTER
/// log (<see cref="FasterLog"/>), durable at its next group commit; while the log's file system is full, sealed tombstone
/// sectors at the data tail instead. An in-memory index (key to data address) is rebuilt
/// on open by scanning the data segments and replaying the committed tombstones; every read is checksum-verified.
/// docs/tiers-ssd.md has the whole design.
/// </summary>
public sealed partial class SsdBlockStore : IDurableBlockStore, IFixedSizeBlockStore, IAsyncDisposable
{
    private const string LogFileName = "blocks.log";
    private const string DataFileName = "blocks.data";
    private const string LockFileName = "kvfabric-ssd.lock";
    private const string CommitFileName = "commits.slots";
    // O_DIRECT alignment: 4 KiB covers disks with 512-byte and 4 KiB logical sectors alike.
    private const uint SectorBytes = 4096;

    private readonly SsdBlockStoreOptions _options;
    private readonly FileStream _lockFile;
    private SsdLogDevice _device;      // replaced, with _log, when the log is reopened after a full file system
    private readonly DirectFileDevice _data;
    private readonly SsdCommitFile _commits;
    private FasterLog _log;
    private readonly object _lock = new();
    private readonly Dictionary<BlockKey, Entry> _index = [];
    private readonly Dictionary<BlockKey, TaskCompletionSource<bool>> _pending = [];
    private KeyValuePair<BlockKey, BlockMeta>[] _recovered = [];
    private long _used;
    private long _reserved;
    private long _reservedDisk;        // disk bytes of the records being written (under _lock)
    private readonly long _diskBudget; // live records' disk bytes the store may hold: CapacityBytes x DiskBytesPerStoredByte
    private readonly long _spanLimit;  // data bytes writes may span, dead ones included (DataSpanLimit): beyond, compaction is behind
    private int _disposed;
    // Data segments: payloads are appended at _dataTail (4 KiB aligned, never straddling a segment); compaction frees
    // segments below _dataBegin. Addresses are never reused while a committed reference may point at them.
    private long _dataBegin;
    private long _dataTail;
    private readonly SortedSet<long> _dataInFlight = []; // data addresses being written, not yet indexed (under _lock)
    // Tombstones in the log, in log order: (log address, data address cancelled). The log is truncated below the first one
    // whose data address is still in a data segment (under _lock).
    // A tombstone appended while the log was paused (full file system) has no log address yet (NotAppended) until the log
    // is reopened; so has one the log lost: reopening appends every tombstone past the last good commit again. Seq numbers
    // them in order (tombstone sectors written while the log is paused cover a prefix of them: _sectoredThrough).
    private Queue<Tombstone> _tombstones = new();
    private long _tombstoneSeq;
    private const long NotAppended = long.MaxValue;

    private readonly record struct Tombstone(long LogAddress, BlockKey Key, long DataAddress, long Seq);
    private readonly ulong _storeKey;

    // Where a live block is: its record's data address (header sector, then payload) and what its header says, so a read
    // needs one I/O of the payload and can verify it.
    private readonly record struct Entry(long Address, int StoredLength, SsdCodec Codec, BlockMeta Meta, ulong Checksum)
    {
        public int DataLength => SsdRecordHeader.SectorSize + DataBytes(StoredLength);
        public long PayloadAddress => Address + SsdRecordHeader.SectorSize;
        public SsdRecordHeader Header(BlockKey key) => new(SsdRecordKind.Block, Codec, key, Meta, StoredLength);
    }

    private static int DataBytes(int storedLength) => (int)((storedLength + SectorBytes - 1) & ~(long)(SectorBytes - 1));

    private SsdBlockStore(SsdBlockStoreOptions options, ulong storeKey, FileStream lockFile, SsdLogDevice device, DirectFileDevice data, SsdCommitFile commits,
        SsdSlotFile mark, FasterLog log)
    {
        _markFile = mark;
        _storeKey = storeKey;
        _diskBudget = (long)(options.CapacityBytes * DiskBytesPerStoredByte(options));
        _spanLimit = DataSpanLimit(options);
        _commits = commits;
        _options = options;
        _lockFile = lockFile;
        _device = device;
        _data = data;
        _log = log;
        _commits.Refuse = () => _device.FailedCode != 0;
        Directory = Path.GetFullPath(options.Directory);
    }

    public TierKind Kind => TierKind.Ssd;

    /// <summary>The one block length accepted (<see cref="SsdBlockStoreOptions.BlockBytes"/>), 0 for any. The tier manager
    /// refuses other lengths up front, and does not take over recovered blocks of another length (written before a layout
    /// change): reading one into a block of the current layout would fill only part of it.</summary>
    int IFixedSizeBlockStore.BlockBytes => _options.BlockBytes;
    public long CapacityBytes => _options.CapacityBytes;
    public string Directory { get; }

    /// <summary>Stored bytes of the live blocks (compressed length where compressed); the 4 KiB header sectors and padding
    /// are not counted (the free-space check at open allows for them).</summary>
    public long UsedBytes { get { lock (_lock) return _used; } }

    public int Count { get { lock (_lock) return _index.Count; } }

    /// <summary>Every block readable when the store was opened, with the metadata it was written with.</summary>
    public IReadOnlyCollection<KeyValuePair<BlockKey, BlockMeta>> Recovered => _recovered;

    /// <summary>Records and tombstones that failed verification while opening (skipped: their blocks are absent).</summary>
    public int RecoveredCorruptRecords { get; private set; }

    /// <summary>Records found while opening whose payload was not fully on disk: writes under way at a crash (never
    /// acknowledged; the parts not written read as zeros). Skipped like corrupt records, but expected after a crash.</summary>
    public int RecoveredIncompleteWrites { get; private set; }

    /// <summary>Blocks whose payload the device would not read while opening, after retries (an I/O error, not a bad
    /// checksum): they stay indexed, as after a failed read at run time, and are read (and verified) again when asked
    /// for. Count and the first error; 0 and null when every payload was read.</summary>
    public (int Blocks, string? FirstError) RecoveredUnreadable { get; private set; }

    /// <summary>Payloads read and verified while opening: those of records at or above the settled mark (writes that a
    /// crash may have torn), or every one with <see cref="SsdBlockStoreOptions.VerifyAllOnOpen"/>. 0 after a clean close
    /// (unless a write failed, or a payload could not be read at the previous open: those hold the mark below them).</summary>
    public int RecoveredVerifiedPayloads { get; private set; }

    /// <summary>Bytes the data segments and the log span between their heads and tails, dead records included.</summary>
    public long LogBytes
    {
        get
        {
            lock (_lock)
                return _dataTail - _dataBegin + (_logOpen ? _log.TailAddress - _log.BeginAddress : 0);
        }
    }

    /// <summary>Bytes the tombstone log spans between its head and tail.</summary>
    internal long TombstoneLogBytes
    {
        get
        {
            lock (_lock)
                return _logOpen ? _log.TailAddress - _log.BeginAddress : 0;
        }
    }

    public bool Contains(BlockKey key)
    {
        lock (_lock)
            return _index.ContainsKey(key);
    }

    /// <summary>Opens (creating or recovering) the store in <see cref="SsdBlockStoreOptions.Directory"/>.</summary>
    public static async Task<SsdBlockStore> OpenAsync(SsdBlockStoreOptions options, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(options);
        options.Validate();
        Checksums.EnsureAvailable(ChecksumKind.XxHash3);
        if (options.Compression)
            Zstd.EnsureAvailable();
        string dir = Path.GetFullPath(options.Directory);
        var lockFile = TakeDirectory(dir);
        SsdLogDevice? device = null;
        DirectFileDevice? data = null;
        SsdCommitFile? commits = null;
        SsdSlotFile? mark = null;
        FasterLog? log = null;
        try
        {
            ulong storeKey = SsdLogFormat.CheckOrCreate(dir, options, LogFileName, DataFileName);
            CheckFreeSpace(dir, options);
            device = CreateLogDevice(options);
            // Compacted segments are kept as spares for new ones (writes then go to space already written, as fio's
            // overwrite does), up to the footprint CheckFreeSpace reserved.
            int spares = (int)Math.Min(4096, (long)(options.CapacityBytes * (1 + options.CompactionSlack)) / options.SegmentBytes + 1);
            data = new DirectFileDevice(Path.Combine(dir, DataFileName), SectorBytes, SsdRecordHeader.SectorSize + DataBytes(options.MaxBlockBytes),
                preallocateBytes: options.SegmentBytes, maxSpares: spares)
            {
                ReadFault = options.DataReadFault,
                WriteFault = options.DataWriteFault,
                DirectorySyncFault = options.DirectorySyncFault,
            };
            commits = new SsdCommitFile(Path.Combine(dir, CommitFileName));
            log = await FasterLog.CreateAsync(LogSettings(options, device, commits), cancellationToken).ConfigureAwait(false);
            mark = new SsdSlotFile(Path.Combine(dir, MarkFileName), MarkMagic);
            DirectFileDevice.SyncDirectory(dir); // the format, commit and mark files just created keep their names after a crash
            // The recovery scan reads every data segment: off the caller's thread, and without blocking a pool thread.
            var store = new SsdBlockStore(options, storeKey, lockFile, device, data, commits, mark, log);
            await Task.Run(store.RecoverAsync, cancellationToken).ConfigureAwait(false);
            return store;
        }
        catch (Exception e) when (e is not TierException and not OperationCanceledException and not ArgumentException)
        {
            log?.Dispose();
            device?.Dispose();
            data?.Dispose();
            commits?.Dispose();
            mark?.Dispose();
            lockFile.Dispose();
            throw new TierException($"Could not open the SSD tier's log in {dir}: {e.Message}. Check that the directory is on a local file system "
                + "that supports O_DIRECT (not tmpfs on old kernels) and that its files are not damaged; move the directory aside to start empty.", e);
        }
        catch
        {
            log?.Dispose();
            device?.Dispose();
            data?.Dispose();
            commits?.Dispose();
            mark?.Dispose();
            lockFile.Dispose();
            throw;
        }
    }

    private static SsdLogDevice CreateLogDevice(SsdBlockStoreOptions options)
    {
        string logPath = Path.Combine(Path.GetFullPath(options.Directory), LogFileName);
        return new SsdLogDevice(options.DeviceFactory?.Invoke(logPath) ?? new DirectFileDevice(logPath, SectorBytes, SsdRecordHeader.AddressedSize));
    }

    // Recovers the log to its newest good commit (FASTER's tail is then that commit's address).
    private static FasterLogSettings LogSettings(SsdBlockStoreOptions options, IDevice device, SsdCommitFile commits) => new()
    {
        LogDevice = device,
        LogCommitManager = commits,
        PageSizeBits = BitOperations.Log2((uint)options.LogPageBytes),
        MemorySizeBits = BitOperations.Log2((ulong)options.LogPageBytes * (ulong)options.LogMemoryPages),
        SegmentSizeBits = BitOperations.Log2((ulong)options.SegmentBytes),
        TryRecoverLatest = true,
        RemoveOutdatedCommits = true,
        AutoRefreshSafeTailAddress = false,
    };

    // One process per directory: two writers appending to one log would destroy it. FileShare.None takes flock(LOCK_EX).
    private static FileStream TakeDirectory(string dir)
    {
        try
        {
            System.IO.Directory.CreateDirectory(dir);
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new TierException($"The SSD tier directory {dir} cannot be created ({e.Message}); create it, or give a directory this process may write.", e);
        }
        string path = Path.Combine(dir, LockFileName);
        try
        {
            return new FileStream(path, FileMode.OpenOrCreate, FileAccess.ReadWrite, FileShare.None, 1, FileOptions.None);
        }
        catch (UnauthorizedAccessException e)
        {
            throw new TierException($"The SSD tier directory {dir} is not writable by this process ({e.Message}); fix its permissions or choose another directory.", e);
        }
        catch (IOException e)
        {
            throw new TierException($"The SSD tier directory {dir} is in use by another process (lock {path} is held: {e.Message}); "
                + "stop that process, or give each sidecar its own directory.", e);
        }
    }

    // The data segments span at most DataSpanLimit for writes: live records (CapacityBytes x perByte) and dead ones up to
    // the slack (compaction starts there), plus one segment of lag for compaction; past it writes are refused until
    // compaction frees a segment. Compaction's copies go past the limit (they are what frees space): up to one segment's
    // live records while the segment they leave is still on disk. The tail segment is preallocated whole. The log keeps
    // a segment below its begin address until FASTER deletes the file, and a tombstone (96 bytes with FASTER's framing)
    // per removed record not yet compacted away (a record takes at least 8 KiB). So the disk the store may take:
    internal static long DataSpanLimit(SsdBlockStoreOptions options) =>
        (long)(options.CapacityBytes * (1 + options.CompactionSlack) * DiskBytesPerStoredByte(options)) + options.SegmentBytes;

    internal static long FootprintBytes(SsdBlockStoreOptions options)
    {
        long span = DataSpanLimit(options);
        long tombstones = span / (2 * SsdRecordHeader.SectorSize) * 96;
        return span + 2L * options.SegmentBytes /* compaction's copies, the preallocated tail */
            + options.SegmentBytes + tombstones + 2L * options.LogPageBytes /* the log */;
    }

    // Refuse a capacity the file system cannot hold, rather than fail with ENOSPC hours later (or leave compaction no
    // room to copy into, which is the only way space comes back).
    private static void CheckFreeSpace(string dir, SsdBlockStoreOptions options)
    {
        long existing = System.IO.Directory.EnumerateFiles(dir, LogFileName + ".*").Concat(System.IO.Directory.EnumerateFiles(dir, DataFileName + ".*"))
            .Sum(f => new FileInfo(f).Length);
        long available = new DriveInfo(dir).AvailableFreeSpace + existing;
        double perByte = DiskBytesPerStoredByte(options);
        int block = options.BlockBytes > 0 ? options.BlockBytes : Math.Min(options.MaxBlockBytes, 64 << 10);
        long needed = FootprintBytes(options);
        if (available < needed)
            throw new TierException($"The SSD tier in {dir} needs up to {needed >> 20} MiB of disk (CapacityBytes {options.CapacityBytes >> 20} MiB "
                + $"x (1 + CompactionSlack {options.CompactionSlack}) x {perByte:F3} for the header sectors of {block}-byte blocks, + 4 segments of "
                + $"{options.SegmentBytes >> 20} MiB for compaction's lag and copies, the preallocated tail and the log, + the tombstones), "
                + $"but only {available >> 20} MiB is free there (counting the store's own files); "
                + "lower CapacityBytes or free space on that file system (for a small tier, a smaller SegmentBytes also lowers the reserve).");
    }

    // Each record also takes a 4 KiB header sector and its padding: the disk a stored byte takes for the blocks expected
    // (BlockBytes, or 64 KiB when any length is accepted). The write path holds live records to this times the capacity,
    // so blocks that compress to little, or smaller ones, are refused before they outgrow the disk the store reserved.
    private static double DiskBytesPerStoredByte(SsdBlockStoreOptions options)
    {
        int block = options.BlockBytes > 0 ? options.BlockBytes : Math.Min(options.MaxBlockBytes, 64 << 10);
        return (SsdRecordHeader.SectorSize + DataBytes(block)) / (double)block;
    }

    private void ThrowIfDisposed() => ObjectDisposedException.ThrowIf(Volatile.Read(ref _disposed) != 0, this);

    // FASTER reports a device error as a bare code; the device keeps the message with the file and the errno text.
    private string DeviceError(Exception e) =>
        _device.LastError is { } detail && !e.Message.Contains(detail, StringComparison.Ordinal) ? $"{e.Message}: {detail}" : e.Message;

    [DoesNotReturn]
    private void ThrowFaulted(Exception fault) =>
        throw new TierException($"The SSD tier in {Directory} stopped accepting writes after a device error ({DeviceError(fault)}). Blocks written "
            + "before it stay readable. Free space on that file system or replace the device, then reopen the store.", fault);

    public void Dispose() => DisposeAsync().AsTask().GetAwaiter().GetResult();

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        // Compaction first (it needs the committer for the segment it is on), then one last commit, so that the
        // tombstones of the last removals are durable, then the committer ends.
        _stopping = true;
        await WaitForCompactionAsync().ConfigureAwait(false);
        await WaitForWritersAsync().ConfigureAwait(false);
        await StopMarkAsync().ConfigureAwait(false); // the last mark: a clean close leaves nothing to verify at the next open
        _stopCommitter = true;
        _commitSignal.Release();
        await _committer.ConfigureAwait(false);
        if (_logOpen)
        {
            _log.Dispose();
            _device.Dispose();
        }
        _data.Dispose();
        _commits.Dispose();
        _lockFile.Dispose();
        _commitSignal.Dispose();
        _commitSlots.Dispose();
    }
}
