namespace KvFabric.Memory;

/// <summary>Where registered bytes live. Decides which transfer backends can reach them.</summary>
public enum MemoryKind : byte
{
    /// <summary>Private host memory of one process: reachable by peers only through a network backend.</summary>
    Host = 1,
    /// <summary>Host memory in a shared segment (/dev/shm) that another local process can map.</summary>
    SharedHost = 2,
    /// <summary>GPU memory (needs a device backend; see issue 8).</summary>
    Device = 3,
    /// <summary>A file mapped into memory: transfers land in the page cache and are flushed with msync.</summary>
    File = 4,
}

/// <summary>A block of native memory with a stable address for its whole life.</summary>
public interface INativeMemory
{
    nint Address { get; }
    long Length { get; }
    MemoryKind Kind { get; }
    /// <summary>The file another local process maps to reach these bytes (a /dev/shm segment or a file), or null.</summary>
    string? MappedPath { get; }
}
