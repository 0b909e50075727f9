using System.Security.Cryptography;

namespace KvFabric.Memory;

/// <summary>
/// Named host memory in /dev/shm that another process on this host maps by name (the shared-memory backend's target).
/// Names carry the owner's pid (<c>kvfabric-PID-…</c>) so segments left by a killed process can be found and removed.
/// </summary>
public static class SharedMemorySegment
{
    public const string Directory = "/dev/shm";
    private const string Prefix = "kvfabric-";

    /// <summary>Creates a segment with an unguessable name owned by this process; it is unlinked when disposed.</summary>
    public static MappedMemory Create(long length, string tag = "seg", bool lockInRam = false)
    {
        if (!System.IO.Directory.Exists(Directory))
            throw new IOException($"{Directory} is missing: shared memory needs a tmpfs mounted there");
        foreach (char c in tag)
        {
            if (!char.IsAsciiLetterOrDigit(c) && c != '-' && c != '_')
                throw new ArgumentException($"segment tag '{tag}' may hold only ASCII letters, digits, '-' and '_'", nameof(tag));
        }
        string name = $"{Prefix}{Environment.ProcessId}-{tag}-{Convert.ToHexStringLower(RandomNumberGenerator.GetBytes(8))}";
        return MappedMemory.Create(Path.Combine(Directory, name), length, MemoryKind.SharedHost, unlinkOnDispose: true, lockInRam);
    }

    /// <summary>
    /// Whether <paramref name="path"/> names a KvFabric segment: a file directly in /dev/shm. A further '/' would walk
    /// through a directory (or a link to one) that anyone can plant there, out of /dev/shm; O_NOFOLLOW guards only the
    /// last component.
    /// </summary>
    public static bool IsSegmentPath(string path) =>
        path.StartsWith(Directory + "/" + Prefix, StringComparison.Ordinal) && path.IndexOf('/', Directory.Length + 1) < 0
        && !path.Contains("..", StringComparison.Ordinal);

    /// <summary>Maps a segment another process created.</summary>
    public static MappedMemory Open(string path, long expectedLength)
    {
        if (!IsSegmentPath(path))
            throw new ArgumentException($"'{path}' is not a KvFabric shared-memory segment ({Directory}/{Prefix}*)", nameof(path));
        return MappedMemory.Open(path, expectedLength, MemoryKind.SharedHost);
    }

    /// <summary>
    /// Removes segments whose owning process no longer exists (left behind by a crash or SIGKILL): the pid in the name
    /// is not visible here and no process holds the creator's lock on the file.
    /// </summary>
    public static int RemoveStale()
    {
        if (!System.IO.Directory.Exists(Directory))
            return 0;
        int removed = 0;
        foreach (string path in System.IO.Directory.EnumerateFiles(Directory, Prefix + "*"))
        {
            string rest = Path.GetFileName(path)[Prefix.Length..];
            int dash = rest.IndexOf('-', StringComparison.Ordinal);
            if (dash <= 0 || !int.TryParse(rest.AsSpan(0, dash), out int pid))
                continue;
            // A pid we cannot see may be a live owner in another PID namespace sharing this /dev/shm (containers):
            // the owner's lock on the file decides.
            if (System.IO.Directory.Exists($"/proc/{pid}") || MappedMemory.IsHeld(path))
                continue;
            try
            {
                File.Delete(path);
                removed++;
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // Another cleaner got there first, or it belongs to another user: not ours to remove.
            }
        }
        return removed;
    }
}
