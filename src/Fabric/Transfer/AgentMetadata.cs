using System.Buffers.Binary;
using System.Text;
using KvFabric.Memory;

namespace KvFabric.Transfer;

/// <summary>One region as a peer sees it: where it is, how big, and the key that opens it.</summary>
public sealed record RemoteRegionInfo(uint Id, MemoryKind Kind, ulong Address, ulong Length, int DeviceId, RegionKey Key, string? MappedPath)
    : IAddressRange
{
    public ulong End => Address + Length;
    ulong IAddressRange.Start => Address;
    /// <summary>The region's packed UCX rkey (ucp_rkey_pack), empty when the owner runs without UCX (metadata version 3).</summary>
    public ReadOnlyMemory<byte> UcxRkey { get; init; }

    // Value equality includes the rkey's bytes (ReadOnlyMemory compares by reference).
    public bool Equals(RemoteRegionInfo? other) =>
        other is not null && Id == other.Id && Kind == other.Kind && Address == other.Address && Length == other.Length
        && DeviceId == other.DeviceId && Key == other.Key && MappedPath == other.MappedPath && UcxRkey.Span.SequenceEqual(other.UcxRkey.Span);

    public override int GetHashCode() => HashCode.Combine(Id, Address, Length, Key);
}

/// <summary>
/// What a peer needs to reach an agent: identity, host, endpoints per backend, and the regions (with keys) it was given.
/// Serialized as a small versioned binary blob (see docs/transfer.md); parsing checks every length.
/// </summary>
public sealed record AgentMetadata(
    string Name,
    Guid AgentId,
    string HostId,
    int ProcessId,
    string TcpHost,
    int TcpPort,
    int MaxChunkBytes,
    ReadOnlyMemory<byte> LayoutFingerprint,
    IReadOnlyList<RemoteRegionInfo> Regions)
{
    private const uint Magic = 0x4146564B; // "KVFA"
    private const ushort Version = 2; // 2: adds the max chunk size
    private const ushort UcxVersion = 3; // 3: version 2 followed by a UCX section (written only when UCX is enabled)
    private const int MaxUcxBlob = 1 << 16;

    /// <summary>The packed UCX worker address (ucp_worker_get_address); empty when the agent runs without UCX.</summary>
    public ReadOnlyMemory<byte> UcxWorkerAddress { get; init; }
    private const int MaxRegions = 1 << 20;
    private const int MaxString = 4096;
    internal const int MinChunkBytes = 4096, MaxChunkLimit = 256 << 20;

    public byte[] ToBytes()
    {
        using var ms = new MemoryStream();
        using var w = new BinaryWriter(ms, Encoding.UTF8);
        w.Write(Magic);
        w.Write(UcxWorkerAddress.IsEmpty ? Version : UcxVersion);
        w.Write(AgentId.ToByteArray());
        WriteString(w, Name);
        WriteString(w, HostId);
        w.Write(ProcessId);
        WriteString(w, TcpHost);
        w.Write((ushort)TcpPort);
        w.Write(MaxChunkBytes);
        w.Write((byte)LayoutFingerprint.Length);
        w.Write(LayoutFingerprint.Span);
        w.Write(Regions.Count);
        foreach (var r in Regions)
        {
            w.Write(r.Id);
            w.Write((byte)r.Kind);
            w.Write(r.Address);
            w.Write(r.Length);
            w.Write(r.DeviceId);
            w.Write(r.Key.Value);
            WriteString(w, r.MappedPath ?? "");
        }
        if (!UcxWorkerAddress.IsEmpty)
        {
            // Version 3: u32 length ‖ worker address, then per region (in the order above) u16 length ‖ packed rkey.
            w.Write(UcxWorkerAddress.Length);
            w.Write(UcxWorkerAddress.Span);
            foreach (var r in Regions)
            {
                if (r.UcxRkey.Length > MaxUcxBlob - 1)
                    throw new ArgumentException($"a {r.UcxRkey.Length}-byte UCX rkey exceeds {MaxUcxBlob - 1} bytes");
                w.Write((ushort)r.UcxRkey.Length);
                w.Write(r.UcxRkey.Span);
            }
        }
        w.Flush();
        return ms.ToArray();
    }

    public static AgentMetadata Parse(ReadOnlySpan<byte> bytes)
    {
        var r = new Reader(bytes);
        if (r.U32() != Magic)
            throw Malformed("it does not start with the KvFabric agent-metadata magic (KVFA); is this metadata at all?");
        ushort version = r.U16();
        if (version is not (Version or UcxVersion))
            throw Malformed($"version {version} is not supported (this build reads versions {Version} and {UcxVersion}); upgrade the older side");
        var id = new Guid(r.Bytes(16));
        string name = r.Str();
        string host = r.Str();
        int pid = r.I32();
        string tcpHost = r.Str();
        int tcpPort = r.U16();
        int maxChunk = r.I32();
        if (maxChunk is < MinChunkBytes or > MaxChunkLimit)
            throw Malformed($"max chunk size {maxChunk} is out of range ({MinChunkBytes}..{MaxChunkLimit})");
        int fpLen = r.U8();
        byte[] fp = r.Bytes(fpLen).ToArray();
        int count = r.I32();
        if (count < 0 || count > MaxRegions)
            throw Malformed($"region count {count} is out of range (0..{MaxRegions})");
        var regions = new RemoteRegionInfo[count];
        for (int i = 0; i < count; i++)
        {
            uint rid = r.U32();
            var kind = (MemoryKind)r.U8();
            if (!Enum.IsDefined(kind))
                throw Malformed($"region {rid} has unknown memory kind {(byte)kind}");
            ulong addr = r.U64(), len = r.U64();
            if (len == 0 || addr + len < addr)
                throw Malformed($"region {rid} has an invalid range [0x{addr:x}, +{len})");
            int dev = r.I32();
            var key = new RegionKey(r.U64());
            string path = r.Str();
            regions[i] = new RemoteRegionInfo(rid, kind, addr, len, dev, key, path.Length == 0 ? null : path);
        }
        byte[] ucxAddress = [];
        if (version == UcxVersion)
        {
            int addrLen = r.I32();
            if (addrLen is <= 0 or > MaxUcxBlob)
                throw Malformed($"UCX worker address length {addrLen} is out of range (1..{MaxUcxBlob})");
            ucxAddress = r.Bytes(addrLen).ToArray();
            for (int i = 0; i < count; i++)
                regions[i] = regions[i] with { UcxRkey = r.Bytes(r.U16()).ToArray() };
        }
        if (!r.AtEnd)
            throw Malformed($"{r.Remaining} unexpected bytes after the last region");
        return new AgentMetadata(name, id, host, pid, tcpHost, tcpPort, maxChunk, fp, regions) { UcxWorkerAddress = ucxAddress };
    }

    private static void WriteString(BinaryWriter w, string s)
    {
        byte[] b = Encoding.UTF8.GetBytes(s);
        if (b.Length > MaxString)
            throw new ArgumentException($"metadata string of {b.Length} bytes exceeds {MaxString}");
        w.Write((ushort)b.Length);
        w.Write(b);
    }

    private static TransferException Malformed(string why) => new($"malformed agent metadata: {why}");

    private ref struct Reader(ReadOnlySpan<byte> data)
    {
        private ReadOnlySpan<byte> _rest = data;
        public readonly bool AtEnd => _rest.IsEmpty;
        public readonly int Remaining => _rest.Length;

        public ReadOnlySpan<byte> Bytes(int n)
        {
            if (n < 0 || n > _rest.Length)
                throw Malformed($"truncated: needed {n} more bytes, {_rest.Length} left");
            var s = _rest[..n];
            _rest = _rest[n..];
            return s;
        }

        public byte U8() => Bytes(1)[0];
        public ushort U16() => BinaryPrimitives.ReadUInt16LittleEndian(Bytes(2));
        public uint U32() => BinaryPrimitives.ReadUInt32LittleEndian(Bytes(4));
        public int I32() => BinaryPrimitives.ReadInt32LittleEndian(Bytes(4));
        public ulong U64() => BinaryPrimitives.ReadUInt64LittleEndian(Bytes(8));
        public string Str() => Encoding.UTF8.GetString(Bytes(U16()));
    }
}

/// <summary>Identifies this boot of this machine, so two agents can tell they share memory (and /dev/shm).</summary>
internal static class HostIdentity
{
    public static readonly string Current = Compute();

    private static string Compute()
    {
        const string bootId = "/proc/sys/kernel/random/boot_id";
        string boot = File.Exists(bootId) ? File.ReadAllText(bootId).Trim() : "no-boot-id";
        return $"{Environment.MachineName}/{boot}";
    }
}
