using System.Buffers.Binary;
using System.Runtime.InteropServices;
using FASTER.core;
using KvFabric.Native;
using KvFabric.Transfer;
using Microsoft.Win32.SafeHandles;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// FASTER's commit records in one file of two 4 KiB slots, written alternately with one O_DIRECT | O_DSYNC write each.
/// FASTER's default manager creates a file per commit and deletes the previous one (create + sync write + unlink: 5-15 ms
/// of journal traffic per commit here, which capped group commit at a third of the disk, docs/tiers-ssd.md). A slot holds
/// {magic, commit number, length, XXH3} and FASTER's metadata; a torn slot fails its checksum and the other slot, the
/// previous commit, is used, whose data is still on disk because FASTER frees segments only after a commit lands.
/// </summary>
internal sealed unsafe class SsdCommitFile : ILogCommitManager
{
    private const int SlotBytes = 4096, HeaderBytes = 24, O_DIRECT = 0x4000, O_DSYNC = 0x1000;
    private const uint Magic = 0x4D435653; // "SVCM"

    private readonly string _path;
    private readonly SafeFileHandle _file;
    private readonly byte* _buffer;
    private readonly object _lock = new();
    private readonly (long Number, byte[] Metadata)?[] _slots = new (long, byte[])?[2];

    public SsdCommitFile(string path)
    {
        _path = path;
        int flags = Libc.O_RDWR | Libc.O_CREAT | Libc.O_CLOEXEC | O_DSYNC;
        int fd = Libc.Open(path, flags | O_DIRECT, 0x1A4);
        if (fd < 0)
            fd = Libc.Open(path, flags, 0x1A4);
        if (fd < 0)
            throw new IOException($"cannot open the commit file {path}: {Libc.LastError()}");
        _file = new SafeFileHandle(fd, ownsHandle: true);
        _buffer = (byte*)NativeMemory.AlignedAlloc(SlotBytes, SlotBytes);
        for (int slot = 0; slot < 2; slot++)
            _slots[slot] = ReadSlot(slot);
    }

    private Span<byte> Buffer => new(_buffer, SlotBytes);

    private (long, byte[])? ReadSlot(int slot)
    {
        int n = RandomAccess.Read(_file, Buffer, (long)slot * SlotBytes);
        if (n < HeaderBytes)
            return null;
        var b = Buffer;
        long number = BinaryPrimitives.ReadInt64LittleEndian(b[4..]);
        int length = BinaryPrimitives.ReadInt32LittleEndian(b[12..]);
        if (BinaryPrimitives.ReadUInt32LittleEndian(b) != Magic || length < 0 || length > SlotBytes - HeaderBytes)
            return null;
        if (BinaryPrimitives.ReadUInt64LittleEndian(b[16..]) != Checksums.XxHash3(b.Slice(HeaderBytes, length), (ulong)number ^ (ulong)length))
            return null;
        return (number, b.Slice(HeaderBytes, length).ToArray());
    }

    public void Commit(long beginAddress, long untilAddress, byte[] commitMetadata, long commitNum, bool forceWriteMetadata)
    {
        if (commitMetadata.Length > SlotBytes - HeaderBytes)
            throw new TierException($"FASTER commit metadata of {commitMetadata.Length} bytes does not fit a {SlotBytes}-byte slot of {_path}; "
                + "this SSD tier uses no named iterators or cookies, so this is a bug: report it.");
        lock (_lock)
        {
            // Never overwrite the newest good commit: write the other slot.
            int slot = _slots[0] is not { } a ? 0 : _slots[1] is not { } b ? 1 : a.Number <= b.Number ? 0 : 1;
            var buf = Buffer;
            buf.Clear();
            BinaryPrimitives.WriteUInt32LittleEndian(buf, Magic);
            BinaryPrimitives.WriteInt64LittleEndian(buf[4..], commitNum);
            BinaryPrimitives.WriteInt32LittleEndian(buf[12..], commitMetadata.Length);
            commitMetadata.CopyTo(buf[HeaderBytes..]);
            BinaryPrimitives.WriteUInt64LittleEndian(buf[16..], Checksums.XxHash3(commitMetadata, (ulong)commitNum ^ (ulong)commitMetadata.Length));
            RandomAccess.Write(_file, buf, (long)slot * SlotBytes); // O_DSYNC: durable when it returns
            _slots[slot] = (commitNum, commitMetadata);
        }
    }

    public IEnumerable<long> ListCommits()
    {
        lock (_lock)
            return _slots.Where(s => s is not null).Select(s => s!.Value.Number).OrderDescending().ToArray();
    }

    public byte[] GetCommitMetadata(long commitNum)
    {
        lock (_lock)
            return _slots.FirstOrDefault(s => s?.Number == commitNum)?.Metadata ?? throw new InvalidOperationException($"no commit {commitNum} in {_path}");
    }

    public void RemoveCommit(long commitNum)
    {
        // Slots are overwritten in turn; nothing to delete.
    }

    public void RemoveAllCommits()
    {
        lock (_lock)
        {
            Buffer.Clear();
            for (int slot = 0; slot < 2; slot++)
            {
                RandomAccess.Write(_file, Buffer, (long)slot * SlotBytes);
                _slots[slot] = null;
            }
        }
    }

    public void OnRecovery(long commitNum)
    {
    }

    public void Dispose()
    {
        lock (_lock)
        {
            if (_file.IsClosed)
                return;
            _file.Dispose();
            NativeMemory.AlignedFree(_buffer);
        }
    }
}
