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

// A block's 64-byte little-endian header (docs/tiers-ssd.md has the table). It heads the block's reference in the FASTER
// log (header + data address + reference checksum); the payload itself lies in a data segment (blocks.data.N).
//   0 u32 magic "KVSB"   4 u16 version   6 u8 kind   7 u8 codec   8 u32 tenant   12 u8[16] hash (big-endian, as BlockHash)
//  28 u8[16] parent     44 i32 depth    48 i32 raw length        52 i32 stored length   56 u64 checksum
// checksum = XXH3-64(payload, seed: XXH3-64(header bytes 0..56)): it covers every header field and every payload byte.
internal readonly record struct SsdRecordHeader(SsdRecordKind Kind, SsdCodec Codec, BlockKey Key, BlockMeta Meta, int StoredLength)
{
    public const int Size = 64;
    public const uint Magic = 0x4253564B; // "KVSB" read as a little-endian u32
    public const ushort Version = 2;      // 2: payloads in data segments, the log holds references (1: payloads inline)
    private const int ChecksumOffset = 56;

    /// <summary>A block reference in the log: header, u64 data address, u64 XXH3-64 of the 72 bytes before it.</summary>
    public const int RefSize = Size + 16;

    public int RawLength => Meta.Length;

    public static SsdRecordHeader Tombstone(BlockKey key) => new(SsdRecordKind.Tombstone, SsdCodec.None, key, default, 0);

    /// <summary>Writes the header, checksum included, for this payload.</summary>
    public void Write(Span<byte> destination, ReadOnlySpan<byte> payload) => WriteWithChecksum(destination, payload, computed: true, 0);

    /// <summary>Writes the header with a checksum already known (a reference rewritten by compaction).</summary>
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

    /// <summary>Writes a block reference: the header (with the payload's checksum) then the data address and its own checksum.</summary>
    public static void WriteRef(Span<byte> destination, ReadOnlySpan<byte> header, long dataAddress)
    {
        header[..Size].CopyTo(destination);
        BinaryPrimitives.WriteInt64LittleEndian(destination[Size..], dataAddress);
        BinaryPrimitives.WriteUInt64LittleEndian(destination[(Size + 8)..], Checksums.XxHash3(destination[..(Size + 8)]));
    }

    /// <summary>
    /// Parses and verifies one log entry: a block reference (its own checksum; the payload's is checked when the data is
    /// read) or a tombstone (its checksum over the header). Returns null and a reason when anything is off: a torn tail,
    /// a flipped bit, a record of another format.
    /// </summary>
    public static SsdRecordHeader? TryParseEntry(ReadOnlySpan<byte> entry, out long dataAddress, out ulong checksum, out string problem)
    {
        dataAddress = 0;
        checksum = 0;
        if (entry.Length < Size)
        {
            problem = $"log entry of {entry.Length} bytes is shorter than the {Size}-byte header";
            return null;
        }
        var h = entry[..Size];
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(h);
        ushort version = BinaryPrimitives.ReadUInt16LittleEndian(h[4..]);
        if (magic != Magic || version != Version)
        {
            problem = $"bad magic 0x{magic:x8} or version {version} (expected 0x{Magic:x8} v{Version})";
            return null;
        }
        var kind = (SsdRecordKind)h[6];
        var codec = (SsdCodec)h[7];
        int depth = BinaryPrimitives.ReadInt32LittleEndian(h[44..]);
        int raw = BinaryPrimitives.ReadInt32LittleEndian(h[48..]);
        int stored = BinaryPrimitives.ReadInt32LittleEndian(h[52..]);
        checksum = BinaryPrimitives.ReadUInt64LittleEndian(h[ChecksumOffset..]);
        bool shapeOk = kind switch
        {
            SsdRecordKind.Block => entry.Length == RefSize && stored > 0 && raw > 0 && (codec != SsdCodec.None || stored == raw),
            SsdRecordKind.Tombstone => entry.Length == Size && stored == 0 && codec == SsdCodec.None,
            _ => false,
        };
        if (!shapeOk || codec is not (SsdCodec.None or SsdCodec.Zstd) || raw < 0 || stored < 0 || depth < 0)
        {
            problem = $"inconsistent log entry (kind {h[6]}, codec {h[7]}, depth {depth}, raw {raw}, stored {stored}, {entry.Length} bytes)";
            return null;
        }
        if (kind == SsdRecordKind.Block)
        {
            ulong expected = BinaryPrimitives.ReadUInt64LittleEndian(entry[(Size + 8)..]);
            ulong actual = Checksums.XxHash3(entry[..(Size + 8)]);
            if (expected != actual)
            {
                problem = $"XXH3 checksum 0x{actual:x16} of the block reference does not match the stored 0x{expected:x16}";
                return null;
            }
            dataAddress = BinaryPrimitives.ReadInt64LittleEndian(entry[Size..]);
            if (dataAddress < 0 || dataAddress % 4096 != 0)
            {
                problem = $"block reference points at data address {dataAddress}, which is not 4 KiB aligned";
                return null;
            }
        }
        else if (Checksum(h, default) != checksum)
        {
            problem = $"XXH3 checksum of the tombstone does not match the stored 0x{checksum:x16}";
            return null;
        }
        problem = "";
        var key = new BlockKey(BinaryPrimitives.ReadUInt32LittleEndian(h[8..]), BlockHash.FromBytes(h[12..28]));
        var meta = new BlockMeta(BlockHash.FromBytes(h[28..44]), depth, raw);
        return new SsdRecordHeader(kind, codec, key, meta, stored);
    }
}

[InlineArray(SsdRecordHeader.Size)]
internal struct SsdHeaderBytes
{
    private byte _first;
}

// A log entry (a block reference or a tombstone) copied into FASTER's page.
internal readonly struct SsdLogEntry : ILogEnqueueEntry
{
    private readonly SsdRefBytes _bytes;
    private readonly int _length;

    public SsdLogEntry(ReadOnlySpan<byte> bytes)
    {
        bytes.CopyTo(_bytes);
        _length = bytes.Length;
    }

    public int SerializedLength => _length;

    public void SerializeTo(Span<byte> dest) => ((ReadOnlySpan<byte>)_bytes)[.._length].CopyTo(dest);
}

[InlineArray(SsdRecordHeader.RefSize)]
internal struct SsdRefBytes
{
    private byte _first;
}
