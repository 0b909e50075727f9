using KvFabric.Workers.Driver;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>Deployment's lifecycle: what it started is stopped, and the CPU mask it pinned this process to comes back, whether it started or failed part-way.</summary>
[Collection("multi-process")]
public sealed class DeploymentTests
{
    private static readonly DeploymentOptions Tiny = new()
    {
        PrefillWorkers = 1, DecodeWorkers = 1, Model = "tiny", PinCpus = true, GpuBlocks = 64, HostBlocks = 128, SsdDirectory = null,
    };

    /// <summary>kvfabric-worker processes whose parent is this process.</summary>
    private static List<int> WorkerChildren()
    {
        var pids = new List<int>();
        int self = Environment.ProcessId;
        foreach (string dir in Directory.EnumerateDirectories("/proc"))
        {
            if (!int.TryParse(Path.GetFileName(dir), out int pid))
                continue;
            try
            {
                string stat = File.ReadAllText(Path.Combine(dir, "stat"));
                int parent = int.Parse(stat[(stat.LastIndexOf(')') + 2)..].Split(' ')[1], System.Globalization.CultureInfo.InvariantCulture);
                if (parent == self && File.ReadAllText(Path.Combine(dir, "cmdline")).Contains("kvfabric-worker.dll", StringComparison.Ordinal))
                    pids.Add(pid);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException)
            {
                // it ended meanwhile
            }
        }

        return pids;
    }

    [Fact]
    public async Task A_deployment_restores_the_cpu_mask_and_a_failed_start_leaves_nothing_running()
    {
        Assert.True(OperatingSystem.IsLinux(), "pinning and /proc are Linux's");
        int[] before = CpuAffinity.Allowed();
        Assert.True(before.Length >= 2, $"this test needs at least 2 CPUs to pin (has {before.Length})");

        // Started and disposed: the driver's process was pinned to all CPUs but the last while it ran.
        await using (Deployment d = await Deployment.StartAsync(Tiny))
        {
            Assert.Equal(before[..^1], CpuAffinity.Allowed());
            Assert.Equal(2, WorkerChildren().Count);
        }

        Assert.Equal(before, CpuAffinity.Allowed());
        Assert.Empty(WorkerChildren());

        // decode-0 cannot start (an invalid flag); prefill-0 did: it is stopped, and the mask comes back.
        var e = await Assert.ThrowsAsync<InvalidOperationException>(() => Deployment.StartAsync(Tiny with
        {
            WorkerArgs = new Dictionary<string, string[]> { ["decode-0"] = ["--max-batch", "0"] },
        }));
        Assert.Contains("worker decode-0 did not start", e.Message, StringComparison.Ordinal);
        Assert.Equal(before, CpuAffinity.Allowed());
        Assert.Empty(WorkerChildren());
    }

    [Fact]
    public void The_allowed_cpus_are_the_kernels_list_whatever_their_numbers()
    {
        // /proc/self/status lists the CPU set as ranges ("0-3,8,64-127"); Allowed reads the kernel's full-width mask, so
        // the two agree on any machine, CPUs past 63 included.
        string line = File.ReadLines("/proc/self/status").Single(l => l.StartsWith("Cpus_allowed_list:", StringComparison.Ordinal));
        var expected = new List<int>();
        foreach (string range in line["Cpus_allowed_list:".Length..].Trim().Split(',', StringSplitOptions.RemoveEmptyEntries))
        {
            string[] ends = range.Split('-');
            int first = int.Parse(ends[0], System.Globalization.CultureInfo.InvariantCulture);
            int last = int.Parse(ends[^1], System.Globalization.CultureInfo.InvariantCulture);
            expected.AddRange(Enumerable.Range(first, last - first + 1));
        }

        Assert.Equal(expected, CpuAffinity.Allowed());
        // A pin to one CPU reads back as that CPU, and Restore gives the whole set back.
        ulong[]? before = CpuAffinity.Current();
        try
        {
            CpuAffinity.PinCurrentProcess([expected[^1]]);
            Assert.Equal([expected[^1]], CpuAffinity.Allowed());
        }
        finally
        {
            CpuAffinity.Restore(before);
        }

        Assert.Equal(expected, CpuAffinity.Allowed());
    }
}
