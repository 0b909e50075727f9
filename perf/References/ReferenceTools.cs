namespace KvFabric.Bench.References;

/// <summary>Installs the reference tools from Debian packages when asked, and decides what a missing one means.</summary>
public static class ReferenceTools
{
    public static readonly string[] Packages = ["iperf3", "fio", "redis-server", "redis-tools", "ucx-utils", "nghttp2-client"];

    public static async Task InstallAsync(CancellationToken ct)
    {
        if (Environment.UserName != "root")
            throw new InvalidOperationException($"--install-references runs apt-get and needs root; install them yourself: apt-get install -y {string.Join(' ', Packages)}");
        await Tool.RunAsync(TimeSpan.FromMinutes(5), ct, "apt-get", "update", "-q").ConfigureAwait(false);
        await Tool.RunAsync(TimeSpan.FromMinutes(10), ct, "apt-get", ["install", "-y", "-q", .. Packages]).ConfigureAwait(false);
    }

    /// <summary>In CI a missing reference is a failure; elsewhere the figure is reported without it, with a note.</summary>
    public static string Missing(string tool, string package)
    {
        string note = $"{tool} is not installed (apt-get install -y {package}, or pass --install-references): no reference figure";
        if (string.Equals(Environment.GetEnvironmentVariable("CI"), "true", StringComparison.OrdinalIgnoreCase))
            throw new InvalidOperationException(note + "; in CI a missing reference is an error");
        return note;
    }
}
