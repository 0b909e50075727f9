using KvFabric.Native;

namespace KvFabric.Memory;

/// <summary>Private, page-aligned host memory from an anonymous mapping (no GC involvement), optionally locked in RAM.</summary>
public sealed class AnonymousMemory : INativeMemory, IDisposable
{
    private nint _address;

    public nint Address => _address != 0 ? _address : throw new ObjectDisposedException(nameof(AnonymousMemory));
    public long Length { get; private set; }
    public MemoryKind Kind => MemoryKind.Host;
    public string? MappedPath => null;
    public bool IsLocked { get; }

    public AnonymousMemory(long length, bool lockInRam = false)
    {
        if (length <= 0)
            throw new ArgumentOutOfRangeException(nameof(length), length, "a region needs a positive length in bytes");
        nint addr = Libc.Mmap(0, (nuint)length, Libc.PROT_READ | Libc.PROT_WRITE, Libc.MAP_PRIVATE | Libc.MAP_ANONYMOUS, -1, 0);
        if (addr == Libc.MapFailed)
            throw new OutOfMemoryException($"cannot map {length} bytes of host memory ({Libc.LastError()})");
        // Large KV regions benefit from transparent huge pages (fewer TLB misses on 2 MiB copies); advisory only.
        Libc.Madvise(addr, (nuint)length, Libc.MADV_HUGEPAGE);
        if (lockInRam && Libc.Mlock(addr, (nuint)length) != 0)
        {
            string err = Libc.LastError();
            Libc.Munmap(addr, (nuint)length);
            throw new IOException($"cannot lock {length} bytes in RAM ({err}); raise 'ulimit -l' (memlock) or run without locking");
        }
        _address = addr;
        Length = length;
        IsLocked = lockInRam;
    }

    /// <summary>
    /// Grows the mapping to `length` bytes, keeping its contents (the new bytes are zero). The kernel moves page tables
    /// instead of copying (mremap), so growing a GiB takes microseconds, not a copy of it; the address may change.
    /// Not for memory locked in RAM. The caller makes sure nothing uses the old address meanwhile.
    /// </summary>
    public void Grow(long length)
    {
        nint old = Address;
        if (IsLocked)
            throw new InvalidOperationException("a region locked in RAM cannot grow");
        if (length <= Length)
            throw new ArgumentOutOfRangeException(nameof(length), length, $"growing needs more than the current {Length} bytes");
        nint addr = Libc.Mremap(old, (nuint)Length, (nuint)length, Libc.MREMAP_MAYMOVE);
        if (addr == Libc.MapFailed)
            throw new OutOfMemoryException($"cannot grow a {Length}-byte mapping to {length} bytes ({Libc.LastError()})");
        Libc.Madvise(addr, (nuint)length, Libc.MADV_HUGEPAGE);
        _address = addr;
        Length = length;
    }

    public unsafe Span<byte> GetSpan(long offset, int length)
    {
        if (offset < 0 || length < 0 || offset > Length || length > Length - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{length}) is outside this {Length}-byte region");
        return new Span<byte>((byte*)Address + offset, length);
    }

    public void Dispose()
    {
        nint addr = Interlocked.Exchange(ref _address, 0);
        if (addr != 0)
            Libc.Munmap(addr, (nuint)Length);
    }
}
