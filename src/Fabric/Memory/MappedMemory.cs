using KvFabric.Native;

namespace KvFabric.Memory;

/// <summary>
/// A file mapped MAP_SHARED into this process: a /dev/shm segment (<see cref="SharedMemorySegment"/>) or a regular
/// file (<see cref="MemoryKind.File"/>). One mapping implementation serves both, and the peer side opens the same way.
/// </summary>
public sealed unsafe class MappedMemory : INativeMemory, IDisposable
{
    private nint _address;
    private readonly bool _unlinkOnDispose;
    private int _ownerFd = -1; // the creator's descriptor, holding a shared flock: "alive" to stale-segment cleanup

    public nint Address => _address != 0 ? _address : throw new ObjectDisposedException(nameof(MappedMemory), $"mapping of {MappedPath} was disposed");
    public long Length { get; }
    /// <summary>Whether this mapping was unmapped (its address then throws).</summary>
    internal bool IsDisposed => Volatile.Read(ref _address) == 0;
    public MemoryKind Kind { get; }
    public string MappedPath { get; }
    public bool IsLocked { get; }

    private MappedMemory(nint address, long length, MemoryKind kind, string path, bool unlinkOnDispose, bool locked)
    {
        _address = address;
        Length = length;
        Kind = kind;
        MappedPath = path;
        _unlinkOnDispose = unlinkOnDispose;
        IsLocked = locked;
    }

    /// <summary>Creates a new file of <paramref name="length"/> bytes (it must not exist) and maps it.</summary>
    public static MappedMemory Create(string path, long length, MemoryKind kind, bool unlinkOnDispose, bool lockInRam = false)
    {
        if (length <= 0)
            throw new ArgumentOutOfRangeException(nameof(length), length, "a mapping needs a positive length in bytes");
        int fd = Libc.Open(path, Libc.O_RDWR | Libc.O_CREAT | Libc.O_EXCL | Libc.O_CLOEXEC, 0x180 /* 0600: only this user */);
        if (fd < 0)
            throw new IOException($"cannot create '{path}' ({Libc.LastError()}); if it is a stale segment of a dead process, remove it or run 'kvfabric shm-clean'");
        bool keep = false;
        try
        {
            // An owner that unlinks on dispose keeps the file locked while it lives: the pid in a segment's name tells
            // nothing across PID namespaces, the lock does (SharedMemorySegment.RemoveStale).
            if (unlinkOnDispose && Libc.Flock(fd, Libc.LOCK_SH) != 0)
                throw new IOException($"cannot take the owner's file lock on '{path}' ({Libc.LastError()}); does the file system support flock? (segments live in /dev/shm)");
            if (Libc.Ftruncate(fd, length) != 0)
                throw new IOException($"cannot size '{path}' to {length} bytes ({Libc.LastError()}); is the file system (or /dev/shm) full?");
            var mapped = MapFd(fd, path, length, kind, unlinkOnDispose, lockInRam);
            if (unlinkOnDispose)
            {
                mapped._ownerFd = fd;
                keep = true;
            }
            return mapped;
        }
        catch
        {
            File.Delete(path);
            throw;
        }
        finally
        {
            if (!keep)
                Libc.Close(fd);
        }
    }

    /// <summary>Maps an existing file, refusing it unless it is exactly <paramref name="expectedLength"/> bytes.</summary>
    public static MappedMemory Open(string path, long expectedLength, MemoryKind kind)
    {
        if (!File.Exists(path))
            throw new FileNotFoundException($"shared memory '{path}' does not exist: the peer is gone or not on this host", path);
        // The path comes from a peer's metadata: never follow a symbolic link planted in its place.
        int fd = Libc.Open(path, Libc.O_RDWR | Libc.O_CLOEXEC | Libc.O_NOFOLLOW, 0);
        if (fd < 0)
            throw new IOException($"cannot open '{path}' ({Libc.LastError()})");
        try
        {
            // The size of the file opened, not of whatever the path named a moment before (it could have been swapped).
            long length;
            using (var handle = new Microsoft.Win32.SafeHandles.SafeFileHandle(fd, ownsHandle: false))
                length = RandomAccess.GetLength(handle);
            if (length != expectedLength)
                throw new IOException($"'{path}' is {length} bytes, but the peer's metadata says {expectedLength}: stale metadata or a different segment");
            return MapFd(fd, path, expectedLength, kind, unlinkOnDispose: false, lockInRam: false);
        }
        finally
        {
            Libc.Close(fd);
        }
    }

    private static MappedMemory MapFd(int fd, string path, long length, MemoryKind kind, bool unlinkOnDispose, bool lockInRam)
    {
        nint addr = Libc.Mmap(0, (nuint)length, Libc.PROT_READ | Libc.PROT_WRITE, Libc.MAP_SHARED, fd, 0);
        if (addr == Libc.MapFailed)
            throw new IOException($"cannot map {length} bytes of '{path}' ({Libc.LastError()})");
        bool locked = false;
        if (lockInRam)
        {
            if (Libc.Mlock(addr, (nuint)length) != 0)
            {
                string err = Libc.LastError();
                Libc.Munmap(addr, (nuint)length);
                throw new IOException($"cannot lock {length} bytes of '{path}' in RAM ({err}); raise 'ulimit -l' (memlock) or run without locking");
            }
            locked = true;
        }
        return new MappedMemory(addr, length, kind, path, unlinkOnDispose, locked);
    }

    public Span<byte> GetSpan(long offset, int length)
    {
        if (offset < 0 || length < 0 || offset > Length || length > Length - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{length}) is outside the {Length}-byte mapping of {MappedPath}");
        return new Span<byte>((byte*)Address + offset, length);
    }

    /// <summary>Writes dirty pages of a file mapping to the file (no-op cost for /dev/shm).</summary>
    public void Flush()
    {
        if (Libc.Msync(Address, (nuint)Length, Libc.MS_SYNC) != 0)
            throw new IOException($"msync of '{MappedPath}' failed ({Libc.LastError()})");
    }

    public void Dispose()
    {
        nint addr = Interlocked.Exchange(ref _address, 0);
        if (addr == 0)
            return;
        Libc.Munmap(addr, (nuint)Length);
        if (_unlinkOnDispose)
            File.Delete(MappedPath);
        if (_ownerFd >= 0)
            Libc.Close(_ownerFd); // after the unlink: cleanup never finds the file unlocked while we own it
    }

    /// <summary>Whether some process holds the creator's lock on the file at <paramref name="path"/> (or it cannot be told).</summary>
    internal static bool IsHeld(string path)
    {
        int fd = Libc.Open(path, Libc.O_RDONLY | Libc.O_NOFOLLOW | Libc.O_CLOEXEC, 0);
        if (fd < 0)
            return true; // gone, or not ours to open: not ours to remove either
        try
        {
            return Libc.Flock(fd, Libc.LOCK_EX | Libc.LOCK_NB) != 0;
        }
        finally
        {
            Libc.Close(fd); // releases the probe's lock, if it got one
        }
    }
}
