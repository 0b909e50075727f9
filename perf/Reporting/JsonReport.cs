using System.Text.Json;
using System.Text.Json.Nodes;

namespace KvFabric.Bench.Reporting;

/// <summary>Writes a result as JSON with the machine and the exact command that produced it.</summary>
public static class JsonReport
{
    public static JsonObject Header(string suite) => new()
    {
        ["suite"] = suite,
        ["command"] = "kvfabric-bench " + string.Join(' ', Environment.GetCommandLineArgs().Skip(1)),
        ["timestamp"] = DateTimeOffset.UtcNow.ToString("O"),
        ["machine"] = new JsonObject
        {
            ["host"] = Environment.MachineName,
            ["cores"] = Environment.ProcessorCount,
            ["os"] = System.Runtime.InteropServices.RuntimeInformation.OSDescription,
            ["runtime"] = System.Runtime.InteropServices.RuntimeInformation.FrameworkDescription,
        },
    };

    public static JsonObject Of(Spread s) => new() { ["median"] = Round(s.Median), ["min"] = Round(s.Min), ["max"] = Round(s.Max), ["runs"] = s.Runs };

    public static double Round(double v) => double.IsFinite(v) ? Math.Round(v, 4) : 0;

    public static void Write(string? path, JsonObject report)
    {
        if (string.IsNullOrEmpty(path))
            return;
        string? dir = Path.GetDirectoryName(Path.GetFullPath(path));
        if (dir is not null)
            Directory.CreateDirectory(dir);
        File.WriteAllText(path, report.ToJsonString(new JsonSerializerOptions { WriteIndented = true }) + "\n");
    }
}

/// <summary>Helpers for `--quick`: a flag the user did not give takes the CI-sized value instead of its default.</summary>
public static class QuickDefaults
{
    public static T Pick<T>(System.CommandLine.ParseResult parse, System.CommandLine.Option<T> option, bool quick, T quickValue) =>
        quick && parse.GetResult(option) is not { Implicit: false } ? quickValue : parse.GetValue(option)!;
}
