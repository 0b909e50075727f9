using System.ComponentModel;
using System.Diagnostics;
using System.Text.Json;
using Xunit;

namespace KvFabric.Tests.Blocks;

// Runs hash_spec_v1.py, an independent implementation of docs/hashing.md, and demands identical vectors.
// No skip when Python is missing: a silently skipped cross-check is how two implementations drift apart.
public sealed class BlockHashSpecCrossCheckTests
{
    private static readonly TimeSpan Timeout = TimeSpan.FromSeconds(60);

    [Fact]
    public async Task PythonImplementationOfTheSpecProducesTheSameVectors()
    {
        string script = Path.Combine(AppContext.BaseDirectory, "Blocks", "hash_spec_v1.py");
        Assert.True(File.Exists(script), $"The spec script was not copied to the test output: {script} is missing.");

        string output = await RunPythonAsync(script);
        using JsonDocument json = JsonDocument.Parse(output);
        Dictionary<string, object> expected = SpecVectors.Compute();

        var pythonKeys = json.RootElement.EnumerateObject().Select(p => p.Name).Order(StringComparer.Ordinal).ToArray();
        Assert.Equal(expected.Keys.Order(StringComparer.Ordinal).ToArray(), pythonKeys);
        foreach ((string key, object value) in expected)
        {
            JsonElement actual = json.RootElement.GetProperty(key);
            if (value is string[] list)
            {
                string[] fromPython = actual.EnumerateArray().Select(e => e.GetString() ?? "").ToArray();
                Assert.True(list.SequenceEqual(fromPython), $"{key}: C# [{string.Join(", ", list)}] vs Python [{string.Join(", ", fromPython)}]");
            }
            else
            {
                Assert.True((string)value == actual.GetString(), $"{key}: C# {value} vs Python {actual.GetString()}");
            }
        }
    }

    private static async Task<string> RunPythonAsync(string script)
    {
        var start = new ProcessStartInfo("python3")
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        start.ArgumentList.Add(script);

        Process process;
        try
        {
            process = Process.Start(start) ?? throw new InvalidOperationException("Process.Start returned null.");
        }
        catch (Win32Exception e)
        {
            Assert.Fail($"This cross-check needs python3 on PATH to run {script}, but it could not be started: {e.Message}");
            throw;
        }

        using (process)
        {
            Task<string> stdout = process.StandardOutput.ReadToEndAsync();
            Task<string> stderr = process.StandardError.ReadToEndAsync();
            using var cts = new CancellationTokenSource(Timeout);
            try
            {
                await process.WaitForExitAsync(cts.Token);
            }
            catch (OperationCanceledException)
            {
                process.Kill(entireProcessTree: true);
                Assert.Fail($"python3 {script} did not finish within {Timeout.TotalSeconds} s.");
            }

            string output = await stdout;
            string errors = await stderr;
            Assert.True(process.ExitCode == 0, $"python3 {script} exited with {process.ExitCode}:\n{errors}");
            return output;
        }
    }
}
