using System.Runtime.InteropServices;
using KvFabric.Native;
using Xunit;

namespace KvFabric.Tests.Memory;

/// <summary>open(2) flags that differ between Linux architectures must take the value of the one the process runs on.</summary>
public sealed class LibcFlagTests
{
    [Theory]
    [InlineData(Architecture.X64, 0x20000)]   // 0400000
    [InlineData(Architecture.Arm64, 0x8000)]  // 0100000 (0400000 is O_LARGEFILE there)
    [InlineData(Architecture.Arm, 0x8000)]
    [InlineData(Architecture.Ppc64le, 0x8000)]
    public void O_NOFOLLOW_has_the_value_of_the_architecture(Architecture architecture, int flag) =>
        Assert.Equal(flag, Libc.NoFollowFlag(architecture));

    [Fact]
    public void Opening_a_symlink_with_O_NOFOLLOW_fails_with_ELOOP()
    {
        string dir = Directory.CreateTempSubdirectory("kvf-nofollow").FullName;
        try
        {
            string target = Path.Combine(dir, "target"), link = Path.Combine(dir, "link");
            File.WriteAllBytes(target, new byte[16]);
            File.CreateSymbolicLink(link, target);
            int fd = Libc.Open(link, Libc.O_RDONLY | Libc.O_NOFOLLOW | Libc.O_CLOEXEC, 0);
            int errno = Marshal.GetLastPInvokeError();
            if (fd >= 0)
                Libc.Close(fd);
            Assert.True(fd < 0, "a symlink was followed although O_NOFOLLOW was set");
            Assert.Equal(40, errno); // ELOOP
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }
}
