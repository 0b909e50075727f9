using System.Diagnostics;
using Xunit;

namespace KvFabric.Tests.Interop;

/// <summary>Runs the grpcio peers with Debian's python3 (where python3-grpcio lives); a missing grpcio fails loudly.</summary>
internal static class PythonGrpc
{
    public const string Python = "/usr/bin/python3";

    public static string Dir => Path.Combine(AppContext.BaseDirectory, "Interop");
    public static string ProtoRoot => Path.Combine(AppContext.BaseDirectory, "proto");

    public static void RequireGrpcio()
    {
        var (code, output) = RunAsync(["-c", "import grpc, grpc_tools; print(grpc.__version__)"], TimeSpan.FromSeconds(60)).GetAwaiter().GetResult();
        Assert.True(code == 0,
            $"{Python} cannot import grpc/grpc_tools ({output.Trim()}); install them: apt-get install -y python3-grpcio python3-grpc-tools (scripts/install-prereqs.sh does)");
    }

    public static ProcessStartInfo StartInfo(IEnumerable<string> args)
    {
        var psi = new ProcessStartInfo(Python) { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false, WorkingDirectory = Dir };
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        psi.Environment["PYTHONPATH"] = Dir;
        psi.Environment["PYTHONDONTWRITEBYTECODE"] = "1";
        return psi;
    }

    public static async Task<(int Code, string Output)> RunAsync(IEnumerable<string> args, TimeSpan timeout)
    {
        using var p = Process.Start(StartInfo(args)) ?? throw new InvalidOperationException($"cannot start {Python}");
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        using var cts = new CancellationTokenSource(timeout);
        try
        {
            await p.WaitForExitAsync(cts.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            await p.WaitForExitAsync();
            return (-1, $"timed out after {timeout.TotalSeconds:0} s\n{await stdout}\n{await stderr}");
        }

        return (p.ExitCode, await stdout + await stderr);
    }
}
