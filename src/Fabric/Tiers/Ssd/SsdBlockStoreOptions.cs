using System.Numerics;
using FASTER.core;

namespace KvFabric.Tiers.Ssd;

public sealed record SsdBlockStoreOptions
{
    /// <summary>Directory holding the data segments, the log segments, FASTER's commit records and the lock file; created when missing.</summary>
    public required string Directory { get; init; }

    /// <summary>Live bytes the store may hold, counted as stored (after compression), headers excluded.</summary>
    public required long CapacityBytes { get; init; }

    /// <summary>When positive, every block must be exactly this long (a layout's block size); 0 accepts 1..MaxBlockBytes.</summary>
    public int BlockBytes { get; init; }

    /// <summary>The largest block accepted (8 MiB covers vLLM/SGLang page sizes).</summary>
    public int MaxBlockBytes { get; init; } = 8 << 20;

    /// <summary>Try zstd on each block; it is kept only when it saves at least <see cref="MinCompressionSaving"/>.</summary>
    public bool Compression { get; init; } = true;

    public int CompressionLevel { get; init; } = 1;

    /// <summary>Fraction of a block compression must save to be stored compressed (0.125: at most 7/8 of the raw size).</summary>
    public double MinCompressionSaving { get; init; } = 0.125;

    /// <summary>FASTER log page size (the log holds 80-byte tombstones; blocks are records in data segments); a power of two,
    /// at least 4 KiB.</summary>
    public int LogPageBytes { get; init; } = 1 << 20;

    /// <summary>Pages of the in-memory log tail (the write buffer between the writers and the disk); at least 2.</summary>
    public int LogMemoryPages { get; init; } = 4;

    /// <summary>Data and log segment file size (a power of two): compaction frees disk space one data segment at a time.
    /// A new data segment file is preallocated (fallocate) to this size.</summary>
    public long SegmentBytes { get; init; } = 256L << 20;

    /// <summary>
    /// Dead bytes (removed or superseded records) the log may carry, as a fraction of the capacity, before compaction copies
    /// the live records out of the oldest segments and deletes them. Bounds the disk footprint near capacity x (1 + this).
    /// </summary>
    public double CompactionSlack { get; init; } = 0.5;

    /// <summary>
    /// How often, at most, the settled mark (the data address below which every record was written whole) is made durable
    /// while writes go on: opening reads and verifies only the payloads at or above the last mark, and takes the blocks
    /// below it from their header sectors. Shorter: less to verify after a crash, one more 4 KiB sync write per interval.
    /// </summary>
    public TimeSpan SettledMarkInterval { get; init; } = TimeSpan.FromSeconds(1);

    /// <summary>
    /// After a write finds the file system full (ENOSPC, or a quota's EDQUOT), writes are refused for this long without
    /// touching the disk, then tried again: they resume by themselves once space is freed. Any other write error stops
    /// writes until the store is reopened (the device's next move is unknown).
    /// </summary>
    public TimeSpan NoSpaceRetry { get; init; } = TimeSpan.FromSeconds(5);

    /// <summary>
    /// Compaction drops a record it cannot read (so that its segment can be freed) only after three runs in a row failed
    /// on it and at least this long after the first: a device error that passes within it drops nothing.
    /// </summary>
    public TimeSpan CompactionUnreadableGrace { get; init; } = TimeSpan.FromSeconds(30);

    /// <summary>Read and verify every block's payload while opening (a scrub of the whole tier), not only those the settled
    /// mark does not cover. Every read verifies its block either way.</summary>
    public bool VerifyAllOnOpen { get; init; }

    /// <summary>Tests: wraps or replaces the log device (fault injection).</summary>
    internal Func<string, IDevice>? DeviceFactory { get; init; }

    /// <summary>Tests: asked before each read of a data segment (with whether it is the recovery scan's); a message fails
    /// that read with an IOException.</summary>
    internal Func<bool, string?>? DataReadFault { get; init; }

    /// <summary>Tests: asked before each write of a data segment; a message fails that write with an IOException (a
    /// message that starts with "ENOSPC" stands for a full file system, any other for a failing device).</summary>
    internal Func<string?>? DataWriteFault { get; init; }

    /// <summary>Tests: asked before each sync of the directory after a data segment file was created (or a spare renamed
    /// into one); a message fails that fsync with an IOException.</summary>
    internal Func<string?>? DirectorySyncFault { get; init; }

    internal void Validate()
    {
        if (string.IsNullOrWhiteSpace(Directory))
            throw new ArgumentException("SsdBlockStoreOptions.Directory is empty: give the directory the SSD tier keeps its log in.", nameof(Directory));
        if (CapacityBytes <= 0)
            throw new ArgumentOutOfRangeException(nameof(CapacityBytes), CapacityBytes, "SsdBlockStoreOptions.CapacityBytes must be positive: the bytes of blocks the SSD tier may hold.");
        if (MaxBlockBytes <= 0 || MaxBlockBytes > 1 << 28)
            throw new ArgumentOutOfRangeException(nameof(MaxBlockBytes), MaxBlockBytes, "SsdBlockStoreOptions.MaxBlockBytes must be in 1..256 MiB.");
        if (BlockBytes < 0 || BlockBytes > MaxBlockBytes)
            throw new ArgumentOutOfRangeException(nameof(BlockBytes), BlockBytes, $"SsdBlockStoreOptions.BlockBytes must be 0 (any length) or in 1..MaxBlockBytes ({MaxBlockBytes}).");
        if (!BitOperations.IsPow2(LogPageBytes) || LogPageBytes < 4096)
            throw new ArgumentOutOfRangeException(nameof(LogPageBytes), LogPageBytes, "SsdBlockStoreOptions.LogPageBytes must be a power of two of at least 4 KiB.");
        if (LogMemoryPages < 2 || !BitOperations.IsPow2(LogMemoryPages))
            throw new ArgumentOutOfRangeException(nameof(LogMemoryPages), LogMemoryPages, "SsdBlockStoreOptions.LogMemoryPages must be a power of two, at least 2.");
        if (!BitOperations.IsPow2(SegmentBytes) || SegmentBytes < LogPageBytes || SegmentBytes < SsdRecordHeader.SectorSize + MaxBlockBytes + 4096L)
            throw new ArgumentOutOfRangeException(nameof(SegmentBytes), SegmentBytes, "SsdBlockStoreOptions.SegmentBytes must be a power of two, at least "
                + $"LogPageBytes ({LogPageBytes}) and large enough for the largest record ({SsdRecordHeader.SectorSize + MaxBlockBytes + 4096L} bytes for MaxBlockBytes {MaxBlockBytes}).");
        if (CompressionLevel < -7 || CompressionLevel > 22)
            throw new ArgumentOutOfRangeException(nameof(CompressionLevel), CompressionLevel, "SsdBlockStoreOptions.CompressionLevel must be a zstd level in -7..22 (1 is fast, 3 is zstd's default).");
        if (MinCompressionSaving is < 0 or >= 1 || double.IsNaN(MinCompressionSaving))
            throw new ArgumentOutOfRangeException(nameof(MinCompressionSaving), MinCompressionSaving, "SsdBlockStoreOptions.MinCompressionSaving must be in [0, 1).");
        if (SettledMarkInterval <= TimeSpan.Zero || SettledMarkInterval > TimeSpan.FromHours(1))
            throw new ArgumentOutOfRangeException(nameof(SettledMarkInterval), SettledMarkInterval, "SsdBlockStoreOptions.SettledMarkInterval must be positive and at most an hour (1 s by default).");
        if (CompactionSlack is <= 0 || double.IsNaN(CompactionSlack))
            throw new ArgumentOutOfRangeException(nameof(CompactionSlack), CompactionSlack, "SsdBlockStoreOptions.CompactionSlack must be positive (0.5: up to half the capacity again in dead records).");
    }
}
