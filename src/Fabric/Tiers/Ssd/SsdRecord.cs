using System.Buffers.Binary;
using System.Runtime.CompilerServices;
using FASTER.core;
using KvFabric.Blocks;
using KvFabric.Transfer;

namespace KvFabric.Tiers.Ssd;

internal enum SsdRecordKind : byte
{
    Block = 1,
    Tombstone = 2,
}

internal enum SsdCodec : byte
{
    None = 0,
    Zstd = 1,
}

// A block's 64-byte little-endian header (docs/tiers-ssd.md has the tables).
//   0 u32 magic "KVSB"   4 u16 version   6 u8 kind   7 u8 codec   8 u32 tenant   12 u8[16] hash (big-endian, as BlockHash)
//  28 u8[16] parent     44 i32 depth    48 i32 raw length        52 i32 stored length   56 u64 checksum
// checksum = XXH3-64(payload, seed: XXH3-64(header bytes 0..56)): it covers every header field and every payload byte.
//
// Version 3: a block is self-describing in its data segment. Its record is a 4 KiB header sector (this header, the
// record's own data address, and a check of both keyed with the store's secret) followed by the payload, written with one
// O_DIRECT | O_DSYNC write; recovery finds blocks by scanning the data segments. The FASTER log holds tombstones only:
// the header of a removed block (kind 2) with the data address of the newest copy it cancels, and their check. While the
// log's file system is full, a tombstone is written as a sealed kind-2 sector in a data segment instead (WriteTombstoneSector).
internal readonly record struct SsdRecordHeader(SsdRecordKind Kind, SsdCodec Codec, BlockKey Key, BlockMeta Meta, int StoredLength)
{
    public const int Size = 64;
    public const uint Magic = 0x4253564B; // "KVSB" read as a little-endian u32
    public const ushort Version = 3;      // 3: self-describing records in data segments (2: references in the log; 1: payloads inline)
    private const int ChecksumOffset = 56;

    /// <summary>The header sector in front of every payload in a data segment.</summary>
    public const int SectorSize = 4096;

    /// <summary>Header, u64 data address, u64 check: the used part of a header sector, and a tombstone in the log.</summary>
    public const int AddressedSize = Size + 16;

    public int RawLength => Meta.Length;

    public static SsdRecordHeader Tombstone(BlockKey key) => new(SsdRecordKind.Tombstone, SsdCodec.None, key, default, 0);

    /// <summary>Writes the header, checksum included, for this payload.</summary>
    public void Write(Span<byte> destination, ReadOnlySpan<byte> payload) => WriteWithChecksum(destination, payload, computed: true, 0);

    /// <summary>Writes the header with a checksum already known (a record copied by compaction).</summary>
    public void Write(Span<byte> destination, ulong checksum) => WriteWithChecksum(destination, default, computed: false, checksum);

    private void WriteWithChecksum(Span<byte> destination, ReadOnlySpan<byte> payload, bool computed, ulong checksum)
    {
        var h = destination[..Size];
        BinaryPrimitives.WriteUInt32LittleEndian(h, Magic);
        BinaryPrimitives.WriteUInt16LittleEndian(h[4..], Version);
        h[6] = (byte)Kind;
        h[7] = (byte)Codec;
        BinaryPrimitives.WriteUInt32LittleEndian(h[8..], Key.Tenant);
        Key.Hash.WriteTo(h[12..28]);
        Meta.Parent.WriteTo(h[28..44]);
        BinaryPrimitives.WriteInt32LittleEndian(h[44..], Meta.Depth);
        BinaryPrimitives.WriteInt32LittleEndian(h[48..], Meta.Length);
        BinaryPrimitives.WriteInt32LittleEndian(h[52..], StoredLength);
        BinaryPrimitives.WriteUInt64LittleEndian(h[ChecksumOffset..], computed ? Checksum(h, payload) : checksum);
    }

    /// <summary>The checksum this header and payload must carry (what a read verifies the data segment's bytes against).</summary>
    public ulong ChecksumOf(ReadOnlySpan<byte> payload)
    {
        Span<byte> h = stackalloc byte[Size];
        WriteWithChecksum(h, default, computed: false, 0);
        return Checksum(h, payload);
    }

    private static ulong Checksum(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload) =>
        Checksums.XxHash3(payload, Checksums.XxHash3(header[..ChecksumOffset]));

    /// <summary>
    /// Completes a header sector whose first 64 bytes hold this record's header: its data address and the check of both,
    /// XXH3-64 seeded with the store's secret, so that bytes a tenant stored cannot pass for a record when a recovery scan
    /// steps through a torn one. The rest of the sector is zeroed.
    /// </summary>
    public static void SealSector(Span<byte> sector, long dataAddress, ulong storeKey)
    {
        BinaryPrimitives.WriteInt64LittleEndian(sector[Size..], dataAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(sector[(Size + 8)..], Checksums.XxHash3(sector[..(Size + 8)], storeKey));
        sector[AddressedSize..SectorSize].Clear();
    }

    /// <summary>True when the sector starts with the magic number (a cheap filter while scanning for records).</summary>
    public static bool MayBeSector(ReadOnlySpan<byte> sector) => BinaryPrimitives.ReadUInt32LittleEndian(sector) == Magic;

    /// <summary>Where a tombstone sector keeps the data address up to which it cancels its key's copies: right after the
    /// seal. The header's checksum covers it (it is the tombstone's 8-byte payload), and the seal covers the checksum.</summary>
    public const int CancelsOffset = AddressedSize;

    /// <summary>
    /// Parses a data segment's header sector found at <paramref name="dataAddress"/>: a block header whose own fields are
    /// consistent, or a tombstone sector (kind 2) cancelling its key's copies up to <paramref name="cancelsUpTo"/> (always
    /// below its own address), sealed for that address with this store's key. A block's payload checksum is checked when
    /// the payload is read; a tombstone sector has no payload beyond its cancelled address, checked here.
    /// </summary>
    public static SsdRecordHeader? TryParseSector(ReadOnlySpan<byte> sector, long dataAddress, ulong storeKey, out ulong checksum, out long cancelsUpTo,
        out string problem)
    {
        cancelsUpTo = -1;
        var cancels = sector.Slice(CancelsOffset, sizeof(long));
        var header = TryParseAddressed(sector[..AddressedSize], storeKey, cancels, out long address, out checksum, out problem);
        if (header is null)
            return null;
        if (address != dataAddress)
        {
            problem = $"header sector at {dataAddress} is sealed for data address {address}";
            return null;
        }
        if (header.Value.Kind == SsdRecordKind.Tombstone)
        {
            long upTo = BinaryPrimitives.ReadInt64LittleEndian(cancels);
            if (upTo < 0 || upTo >= dataAddress || upTo % SectorSize != 0)
            {
                problem = $"tombstone sector at {dataAddress} cancels up to {upTo}, not below itself";
                return null;
            }
            cancelsUpTo = upTo;
        }
        return header;
    }

    /// <summary>
    /// Fills a tombstone sector for <paramref name="dataAddress"/>: the key's tombstone header (kind 2, no payload) whose
    /// checksum covers the data address up to which it cancels the key's copies (kept at <see cref="CancelsOffset"/>),
    /// sealed for its own address with the store's key as a block's header sector is. Written at the data tail while the
    /// tombstone log's file system is full, so always above every copy it cancels.
    /// </summary>
    public static void WriteTombstoneSector(Span<byte> sector, BlockKey key, long cancelsUpTo, long dataAddress, ulong storeKey)
    {
        Span<byte> cancels = stackalloc byte[sizeof(long)];
        BinaryPrimitives.WriteInt64LittleEndian(cancels, cancelsUpTo);
        Tombstone(key).Write(sector, cancels);
        SealSector(sector, dataAddress, storeKey);
        cancels.CopyTo(sector[CancelsOffset..]);
    }

    /// <summary>Writes a tombstone for the log: the key's header (kind 2) and the data address of the newest copy it cancels.</summary>
    public static void WriteTombstone(Span<byte> destination, BlockKey key, long dataAddress)
    {
        Tombstone(key).Write(destination, ReadOnlySpan<byte>.Empty);
        BinaryPrimitives.WriteInt64LittleEndian(destination[Size..], dataAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[(Size + 8)..], Checksums.XxHash3(destination[..(Size + 8)]));
    }

    /// <summary>Parses and verifies one log entry, a tombstone. Returns null and a reason when anything is off: a torn
    /// tail, a flipped bit, an entry of another format.</summary>
    public static SsdRecordHeader? TryParseTombstone(ReadOnlySpan<byte> entry, out long dataAddress, out string problem)
    {
        dataAddress = 0;
        if (entry.Length != AddressedSize)
        {
            problem = $"log entry of {entry.Length} bytes, expected a {AddressedSize}-byte tombstone";
            return null;
        }
        var header = TryParseAddressed(entry, 0, default, out dataAddress, out _, out problem);
        if (header is { Kind: not SsdRecordKind.Tombstone })
        {
            problem = $"log entry of kind {header.Value.Kind}, expected a tombstone";
            return null;
        }
        return header;
    }

    // Header + u64 data address + u64 XXH3-64 of the 72 bytes before it (seeded with the store's key in header sectors, 0 in
    // the log). Checks the magic, version, shape and check; the payload checksum is returned for the caller. A tombstone's
    // checksum covers its payload: nothing in the log, the cancelled data address in a tombstone sector.
    private static SsdRecordHeader? TryParseAddressed(ReadOnlySpan<byte> bytes, ulong seed, ReadOnlySpan<byte> tombstonePayload, out long dataAddress,
        out ulong checksum, out string problem)
    {
        dataAddress = 0;
        checksum = 0;
        var h = bytes[..Size];
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(h);
        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(h[4..]);
        if (magic != Magic || version != Version)
        {
            problem = $"bad magic 0x{magic:x8} or version {version} (expected 0x{Magic:x8} v{Version})";
            return null;
        }
        ulong expected = BinaryPrimitives.ReadUInt64LittleEndian(bytes[(Size + 8)..]);
        ulong actual = Checksums.XxHash3(bytes[..(Size + 8)], seed);
        if (expected != actual)
        {
            problem = $"XXH3 check 0x{actual:x16} does not match the stored 0x{expected:x16}";
            return null;
        }
        var kind = (SsdRecordKind)h[6];
        var codec = (SsdCodec)h[7];
        int depth = BinaryPrimitives.ReadInt32LittleEndian(h[44..]);
        int raw = BinaryPrimitives.ReadInt32LittleEndian(h[48..]);
        int stored = BinaryPrimitives.ReadInt32LittleEndian(h[52..]);
        checksum = BinaryPrimitives.ReadUInt64LittleEndian(h[ChecksumOffset..]);
        dataAddress = BinaryPrimitives.ReadInt64LittleEndian(bytes[Size..]);
        bool shapeOk = kind switch
        {
            SsdRecordKind.Block => stored > 0 && raw > 0 && (codec != SsdCodec.None || stored == raw),
            SsdRecordKind.Tombstone => stored == 0 && codec == SsdCodec.None && Checksum(h, tombstonePayload) == checksum,
            _ => false,
        };
        if (!shapeOk || codec is not (SsdCodec.None or SsdCodec.Zstd) || raw < 0 || stored < 0 || depth < 0 || dataAddress < 0 || dataAddress % SectorSize != 0)
        {
            problem = $"inconsistent record (kind {h[6]}, codec {h[7]}, depth {depth}, raw {raw}, stored {stored}, data address {dataAddress})";
            return null;
        }
        problem = "";
        var key = new BlockKey(BinaryPrimitives.ReadUInt32LittleEndian(h[8..]), BlockHash.FromBytes(h[12..28]));
        var meta = new BlockMeta(BlockHash.FromBytes(h[28..44]), depth, raw);
        return new SsdRecordHeader(kind, codec, key, meta, stored);
    }
}

// A log entry (a tombstone) copied into FASTER's page.
internal readonly struct SsdLogEntry : ILogEnqueueEntry
{
    private readonly SsdTombstoneBytes _bytes;
    private readonly int _length;

    public SsdLogEntry(ReadOnlySpan<byte> bytes)
    {
        bytes.CopyTo(_bytes);
        _length = bytes.Length;
    }

    public int SerializedLength => _length;

    public void SerializeTo(Span<byte> dest) => ((ReadOnlySpan<byte>)_bytes)[.._length].CopyTo(dest);
}

[InlineArray(SsdRecordHeader.AddressedSize)]
internal struct SsdTombstoneBytes
{
    private byte _first;
}
