using System.Diagnostics;
using System.Globalization;

namespace KvFabric.Bench.Reporting;

/// <summary>CPU time spent by a process (user + system), to report CPU per GB or per call next to throughput.</summary>
public static class ProcessCpu
{
    /// <summary>User plus system CPU seconds of a process, from /proc (clock ticks of 1/100 s).</summary>
    public static double Seconds(int pid)
    {
        string stat = File.ReadAllText($"/proc/{pid}/stat");
        var fields = stat[(stat.LastIndexOf(')') + 2)..].Split(' ');
        return (long.Parse(fields[11], CultureInfo.InvariantCulture) + long.Parse(fields[12], CultureInfo.InvariantCulture)) / 100.0;
    }

    public static double Self => Process.GetCurrentProcess().TotalProcessorTime.TotalSeconds;
}
