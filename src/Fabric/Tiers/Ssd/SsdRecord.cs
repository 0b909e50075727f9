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

// One log record: a fixed 64-byte little-endian header, then the stored payload (docs/tiers-ssd.md has the table).
//   0 u32 magic "KVSB"   4 u16 version   6 u8 kind   7 u8 codec   8 u32 tenant   12 u8[16] hash (big-endian, as BlockHash)
//  28 u8[16] parent     44 i32 depth    48 i32 raw length        52 i32 stored length   56 u64 checksum
// checksum = XXH3-64(payload, seed: XXH3-64(header bytes 0..56)): it covers every header field and every payload byte.
internal readonly record struct SsdRecordHeader(SsdRecordKind Kind, SsdCodec Codec, BlockKey Key, BlockMeta Meta, int StoredLength)
{
    public const int Size = 64;
    public const uint Magic = 0x4253564B; // "KVSB" read as a little-endian u32
    public const ushort Version = 1;
    private const int ChecksumOffset = 56;

    public int RawLength => Meta.Length;
    public int RecordLength => Size + StoredLength;

    public static SsdRecordHeader Tombstone(BlockKey key) => new(SsdRecordKind.Tombstone, SsdCodec.None, key, default, 0);

    /// <summary>Writes the header, checksum included, for this payload.</summary>
    public void Write(Span<byte> destination, ReadOnlySpan<byte> payload)
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
        BinaryPrimitives.WriteUInt64LittleEndian(h[ChecksumOffset..], Checksum(h, payload));
    }

    private static ulong Checksum(ReadOnlySpan<byte> header, ReadOnlySpan<byte> payload) =>
        Checksums.XxHash3(payload, Checksums.XxHash3(header[..ChecksumOffset]));

    /// <summary>
    /// Parses and verifies a whole record (header and payload). Returns null and a reason when anything is off:
    /// a torn tail, a flipped bit, a record of another format.
    /// </summary>
    public static SsdRecordHeader? TryParse(ReadOnlySpan<byte> record, out string problem)
    {
        if (record.Length < Size)
        {
            problem = $"record of {record.Length} bytes is shorter than the {Size}-byte header";
            return null;
        }
        var h = record[..Size];
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
        if (kind is not (SsdRecordKind.Block or SsdRecordKind.Tombstone) || codec is not (SsdCodec.None or SsdCodec.Zstd)
            || raw < 0 || stored < 0 || depth < 0 || stored != record.Length - Size || (codec == SsdCodec.None && stored != raw))
        {
            problem = $"inconsistent header (kind {h[6]}, codec {h[7]}, depth {depth}, raw {raw}, stored {stored}, record {record.Length} bytes)";
            return null;
        }
        ulong expected = BinaryPrimitives.ReadUInt64LittleEndian(h[ChecksumOffset..]);
        ulong actual = Checksum(h, record[Size..]);
        if (expected != actual)
        {
            problem = $"XXH3 checksum 0x{actual:x16} does not match the stored 0x{expected:x16}";
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

// Serializes header + payload straight into FASTER's log page: one copy of the payload on the write path.
internal readonly struct SsdLogEntry(SsdHeaderBytes header, ReadOnlyMemory<byte> payload) : ILogEnqueueEntry
{
    private readonly SsdHeaderBytes _header = header;

    public int SerializedLength => SsdRecordHeader.Size + payload.Length;

    public void SerializeTo(Span<byte> dest)
    {
        ((ReadOnlySpan<byte>)_header).CopyTo(dest);
        payload.Span.CopyTo(dest[SsdRecordHeader.Size..]);
    }
}
