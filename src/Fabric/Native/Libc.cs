using System.Runtime.InteropServices;

namespace KvFabric.Native;

/// <summary>The few libc calls the memory layer needs (Linux x86-64/arm64 values).</summary>
internal static partial class Libc
{
    internal const int O_RDONLY = 0x0, O_RDWR = 0x2, O_CREAT = 0x40, O_EXCL = 0x80, O_CLOEXEC = 0x80000;

    /// <summary>O_NOFOLLOW of the process's architecture: 0400000 in the generic ABI (x86-64), 0100000 on arm and arm64,
    /// where 0400000 is O_LARGEFILE (a shared-memory segment's symlink was then followed).</summary>
    internal static readonly int O_NOFOLLOW = NoFollowFlag(RuntimeInformation.ProcessArchitecture);

    internal static int NoFollowFlag(Architecture architecture) => architecture switch
    {
        Architecture.Arm64 or Architecture.Arm => 0x8000,
        Architecture.Ppc64le => 0x8000,
        _ => 0x20000,
    };
    internal const int PROT_READ = 0x1, PROT_WRITE = 0x2;
    internal const int MAP_SHARED = 0x1, MAP_PRIVATE = 0x2, MAP_ANONYMOUS = 0x20;
    internal const int MADV_HUGEPAGE = 14;
    internal static readonly nint MapFailed = -1;
    internal const int SIGKILL = 9, SIGTERM = 15;

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int Open(string path, int flags, int mode);

    /// <summary>Sets a variable in the native environment (what native libraries read; .NET's own copy is separate).</summary>
    [LibraryImport("libc", EntryPoint = "setenv", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    internal static partial int SetEnv(string name, string value, int overwrite);

    [LibraryImport("libc", EntryPoint = "kill", SetLastError = true)]
    internal static partial int Kill(int pid, int signal);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    internal static partial int Close(int fd);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    internal static partial int Fsync(int fd);

    [LibraryImport("libc", EntryPoint = "ftruncate", SetLastError = true)]
    internal static partial int Ftruncate(int fd, long length);

    [LibraryImport("libc", EntryPoint = "fallocate", SetLastError = true)]
    internal static partial int Fallocate(int fd, int mode, long offset, long length);

    [LibraryImport("libc", EntryPoint = "mmap", SetLastError = true)]
    internal static partial nint Mmap(nint addr, nuint length, int prot, int flags, int fd, long offset);

    [LibraryImport("libc", EntryPoint = "munmap", SetLastError = true)]
    internal static partial int Munmap(nint addr, nuint length);

    // Variadic in C (a fifth argument with MREMAP_FIXED); called with the four fixed ones only.
    [LibraryImport("libc", EntryPoint = "mremap", SetLastError = true)]
    internal static partial nint Mremap(nint oldAddress, nuint oldLength, nuint newLength, int flags);

    internal const int MREMAP_MAYMOVE = 1;

    [LibraryImport("libc", EntryPoint = "mlock", SetLastError = true)]
    internal static partial int Mlock(nint addr, nuint length);

    [LibraryImport("libc", EntryPoint = "madvise", SetLastError = true)]
    internal static partial int Madvise(nint addr, nuint length, int advice);

    [LibraryImport("libc", EntryPoint = "msync", SetLastError = true)]
    internal static partial int Msync(nint addr, nuint length, int flags);

    internal const int MS_SYNC = 4;

    [LibraryImport("libc", EntryPoint = "flock", SetLastError = true)]
    internal static partial int Flock(int fd, int operation);

    internal const int LOCK_SH = 1, LOCK_EX = 2, LOCK_NB = 4;

    internal static string LastError()
    {
        int errno = Marshal.GetLastPInvokeError();
        return $"errno {errno}: {Marshal.GetPInvokeErrorMessage(errno)}";
    }
}
