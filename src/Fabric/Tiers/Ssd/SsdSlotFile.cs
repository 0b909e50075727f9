using System.Buffers.Binary;
using System.Runtime.InteropServices;
using KvFabric.Native;
using KvFabric.Transfer;
using Microsoft.Win32.SafeHandles;

namespace KvFabric.Tiers.Ssd;

/// <summary>
/// A small durable record kept in one file of two 4 KiB slots, written alternately with one O_DIRECT | O_DSYNC write each,
/// so that a write torn by a crash leaves the other slot, the previous version, intact. A slot holds {magic, number,
/// length, XXH3} and up to 4,072 bytes of content; a torn or foreign slot fails its magic or checksum and reads as empty.
/// FASTER's commit records (<see cref="SsdCommitFile"/>) and the store's settled mark use it.
/// </summary>
internal sealed unsafe class SsdSlotFile : IDisposable
{
    public const int SlotBytes = 4096, ContentBytes = SlotBytes - HeaderBytes;
    private const int HeaderBytes = 24;

    private readonly uint _magic;
    private readonly SafeFileHandle _file;
    private readonly byte* _buffer;
    private readonly object _lock = new();
    private readonly (long Number, byte[] Content)?[] _slots = new (long, byte[])?[2];

    public SsdSlotFile(string path, uint magic)
    {
        Path = path;
        _magic = magic;
        int flags = Libc.O_RDWR | Libc.O_CREAT | Libc.O_CLOEXEC | DirectFileDevice.O_DSYNC;
        int fd = Libc.Open(path, flags | DirectFileDevice.O_DIRECT, 0x1A4);
        if (fd < 0)
            fd = Libc.Open(path, flags, 0x1A4);
        if (fd < 0)
            throw new IOException($"cannot open {path}: {Libc.LastError()}");
        _file = new SafeFileHandle(fd, ownsHandle: true);
        _buffer = (byte*)NativeMemory.AlignedAlloc(SlotBytes, SlotBytes);
        try
        {
            ReadAndFill();
        }
        catch
        {
            Dispose();
            throw;
        }
    }

    private void ReadAndFill()
    {
        long length = RandomAccess.GetLength(_file);
        for (int slot = 0; slot < 2; slot++)
        {
            _slots[slot] = ReadSlot(slot);
            // Slots past the end are written once as empty, so that later writes overwrite allocated space (a full disk
            // cannot fail them). Never one that reads valid (a crash during an extending write can leave the file short
            // of a slot whose bytes landed): zeroing it would leave the next write the only version on disk.
            if (_slots[slot] is null && length < (slot + 1L) * SlotBytes)
            {
                Buffer.Clear();
                RandomAccess.Write(_file, Buffer, (long)slot * SlotBytes);
            }
        }
    }

    public string Path { get; }

    private Span<byte> Buffer => new(_buffer, SlotBytes);

    /// <summary>The valid slots' numbers and contents, newest first.</summary>
    public IReadOnlyList<(long Number, byte[] Content)> Slots
    {
        get
        {
            lock (_lock)
                return _slots.Where(s => s is not null).Select(s => s!.Value).OrderByDescending(s => s.Number).ToArray();
        }
    }

    private (long, byte[])? ReadSlot(int slot)
    {
        int n = RandomAccess.Read(_file, Buffer, (long)slot * SlotBytes);
        if (n < HeaderBytes)
            return null;
        var b = Buffer;
        long number = BinaryPrimitives.ReadInt64LittleEndian(b[4..]);
        int length = BinaryPrimitives.ReadInt32LittleEndian(b[12..]);
        if (BinaryPrimitives.ReadUInt32LittleEndian(b) != _magic || length < 0 || length > ContentBytes || n < HeaderBytes + length)
            return null;
        if (BinaryPrimitives.ReadUInt64LittleEndian(b[16..]) != Checksums.XxHash3(b.Slice(HeaderBytes, length), (ulong)number ^ (ulong)length))
            return null;
        return (number, b.Slice(HeaderBytes, length).ToArray());
    }

    /// <summary>Writes a version over the older slot (never over the newest valid one); durable when it returns.</summary>
    public void Write(long number, ReadOnlySpan<byte> content)
    {
        if (content.Length > ContentBytes)
            throw new ArgumentException($"{content.Length} bytes do not fit a {SlotBytes}-byte slot of {Path} (at most {ContentBytes}).", nameof(content));
        lock (_lock)
        {
            ObjectDisposedException.ThrowIf(_file.IsClosed, this);
            int slot = _slots[0] is not { } a ? 0 : _slots[1] is not { } b ? 1 : a.Number <= b.Number ? 0 : 1;
            var buf = Buffer;
            buf.Clear();
            BinaryPrimitives.WriteUInt32LittleEndian(buf, _magic);
            BinaryPrimitives.WriteInt64LittleEndian(buf[4..], number);
            BinaryPrimitives.WriteInt32LittleEndian(buf[12..], content.Length);
            content.CopyTo(buf[HeaderBytes..]);
            BinaryPrimitives.WriteUInt64LittleEndian(buf[16..], Checksums.XxHash3(content, (ulong)number ^ (ulong)content.Length));
            RandomAccess.Write(_file, buf, (long)slot * SlotBytes); // O_DSYNC: durable when it returns
            _slots[slot] = (number, content.ToArray());
        }
    }

    /// <summary>Empties both slots.</summary>
    public void Clear()
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
