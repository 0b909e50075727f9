using System.Buffers.Binary;

namespace KvFabric.Transfer.Tcp;

internal enum FrameType : byte
{
    Hello = 1, HelloOk = 2,
    Write = 3, WriteAck = 4,
    ReadRequest = 5, ReadData = 6,
    Notify = 7, NotifyAck = 8,
    Fence = 9, FenceAck = 10,
    Error = 11,
}

internal enum WireStatus : byte
{
    Ok = 0, UnknownRegion = 1, KeyMismatch = 2, OutOfRange = 3, ChecksumMismatch = 4, Malformed = 5,
    QueueFull = 6, WrongAgent = 7, Internal = 8, ChecksumUnsupported = 9,
}

/// <summary>
/// The fixed 64-byte little-endian header in front of every frame (layout in docs/transfer.md). Payload bytes, if any,
/// follow it directly; for WRITE and READ_DATA they are the block bytes and go straight to registered memory.
/// </summary>
internal struct FrameHeader
{
    public const int Size = 64;
    public const uint Magic = 0x3146564B; // "KVF1"
    public const byte FlagChecksum = 1;
    /// <summary>On HELLO: Chunk is the initiator's stream index, RegionKey its connection set, Aux the streams it abandoned.</summary>
    public const byte FlagStreams = 2;

    public FrameType Type;
    public byte Flags;
    public ChecksumKind ChecksumKind;
    public WireStatus Status;
    public ulong RequestId;
    public uint Chunk;
    public uint RegionId;
    public ulong RegionKey;
    public ulong Offset;
    public uint Length;
    public uint Aux;
    public ulong Checksum;

    public readonly bool HasChecksum => (Flags & FlagChecksum) != 0;

    public readonly void Write(Span<byte> b)
    {
        BinaryPrimitives.WriteUInt32LittleEndian(b, Magic);
        b[4] = (byte)Type;
        b[5] = Flags;
        b[6] = (byte)ChecksumKind;
        b[7] = (byte)Status;
        BinaryPrimitives.WriteUInt64LittleEndian(b[8..], RequestId);
        BinaryPrimitives.WriteUInt32LittleEndian(b[16..], Chunk);
        BinaryPrimitives.WriteUInt32LittleEndian(b[20..], RegionId);
        BinaryPrimitives.WriteUInt64LittleEndian(b[24..], RegionKey);
        BinaryPrimitives.WriteUInt64LittleEndian(b[32..], Offset);
        BinaryPrimitives.WriteUInt32LittleEndian(b[40..], Length);
        BinaryPrimitives.WriteUInt32LittleEndian(b[44..], Aux);
        BinaryPrimitives.WriteUInt64LittleEndian(b[48..], Checksum);
        BinaryPrimitives.WriteUInt64LittleEndian(b[56..], 0);
    }

    /// <summary>Parses a header; a wrong magic or unknown type means the stream cannot be trusted any more.</summary>
    public static FrameHeader Read(ReadOnlySpan<byte> b)
    {
        uint magic = BinaryPrimitives.ReadUInt32LittleEndian(b);
        if (magic != Magic)
            throw new InvalidDataException($"bad frame magic 0x{magic:x8} (expected 0x{Magic:x8}): the peer is not a KvFabric agent or the stream is corrupt");
        var h = new FrameHeader
        {
            Type = (FrameType)b[4],
            Flags = b[5],
            ChecksumKind = (ChecksumKind)b[6],
            Status = (WireStatus)b[7],
            RequestId = BinaryPrimitives.ReadUInt64LittleEndian(b[8..]),
            Chunk = BinaryPrimitives.ReadUInt32LittleEndian(b[16..]),
            RegionId = BinaryPrimitives.ReadUInt32LittleEndian(b[20..]),
            RegionKey = BinaryPrimitives.ReadUInt64LittleEndian(b[24..]),
            Offset = BinaryPrimitives.ReadUInt64LittleEndian(b[32..]),
            Length = BinaryPrimitives.ReadUInt32LittleEndian(b[40..]),
            Aux = BinaryPrimitives.ReadUInt32LittleEndian(b[44..]),
            Checksum = BinaryPrimitives.ReadUInt64LittleEndian(b[48..]),
        };
        if (h.Type is < FrameType.Hello or > FrameType.Error)
            throw new InvalidDataException($"unknown frame type {(byte)h.Type}: the peer speaks another protocol version");
        if (h.HasChecksum && h.ChecksumKind is not (ChecksumKind.XxHash3 or ChecksumKind.Crc32C))
            throw new InvalidDataException($"unknown checksum kind {(byte)h.ChecksumKind}");
        return h;
    }

    public static string Describe(WireStatus status) => status switch
    {
        WireStatus.Ok => "ok",
        WireStatus.UnknownRegion => "the target has no such region (deregistered, or never exported to us)",
        WireStatus.KeyMismatch => "the region key does not match (stale metadata: reload the peer's metadata)",
        WireStatus.OutOfRange => "the range lies outside the target region",
        WireStatus.ChecksumMismatch => "checksum mismatch at the destination: the bytes were corrupted in flight",
        WireStatus.Malformed => "the target found the frame malformed",
        WireStatus.QueueFull => "the target's notification queue is full: it is not draining its notifications",
        WireStatus.WrongAgent => "the endpoint belongs to another agent (the peer restarted): reload its metadata",
        WireStatus.ChecksumUnsupported => "the target cannot compute this checksum (libxxhash missing there): use Crc32C or install libxxhash0 on the target",
        _ => "the target failed internally",
    };
}
