using System.Diagnostics;
using System.Globalization;
using KvFabric.Transfer;
using Xunit;

namespace KvFabric.Tests.Transfer;

/// <summary>A real `kvfabric peer` child process: the remote side of the multi-process tests.</summary>
internal sealed class PeerProcess : IAsyncDisposable
{
    private static readonly TimeSpan ReplyTimeout = TimeSpan.FromSeconds(60);
    private readonly Process _process;

    private PeerProcess(Process process, byte[] metadata, ulong regionAddress)
    {
        _process = process;
        Metadata = metadata;
        RegionAddress = regionAddress;
    }

    public byte[] Metadata { get; private set; }
    public ulong RegionAddress { get; }
    public int Pid => _process.Id;
    public bool HasExited => _process.HasExited;

    public static async Task<PeerProcess> StartAsync(long regionMib, bool shm, params string[] extra)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, "kvfabric.dll");
        var psi = new ProcessStartInfo("dotnet")
        {
            RedirectStandardInput = true,
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string a in new[] { dll, "peer", "--name", "child", "--region-mib", regionMib.ToString(CultureInfo.InvariantCulture) })
            psi.ArgumentList.Add(a);
        if (shm)
            psi.ArgumentList.Add("--shm");
        foreach (string a in extra)
            psi.ArgumentList.Add(a);
        var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start dotnet for the peer process");
        string ready = await ReadLineAsync(p);
        var parts = ready.Split(' ');
        if (parts[0] != "READY")
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"peer did not start: '{ready}' {await p.StandardError.ReadToEndAsync()}");
        }
        return new PeerProcess(p, Convert.FromBase64String(parts[1]), ulong.Parse(parts[2], CultureInfo.InvariantCulture));
    }

    private static async Task<string> ReadLineAsync(Process p)
    {
        string? line = await p.StandardOutput.ReadLineAsync().WaitAsync(ReplyTimeout);
        return line ?? $"EOF (exit {(p.HasExited ? p.ExitCode : -1)})";
    }

    public async Task<string> CommandAsync(string command)
    {
        await _process.StandardInput.WriteLineAsync(command);
        await _process.StandardInput.FlushAsync();
        string reply = await ReadLineAsync(_process);
        if (reply.StartsWith("READY ", StringComparison.Ordinal))
            Metadata = Convert.FromBase64String(reply.Split(' ')[1]);
        return reply;
    }

    public MemoryDescriptor Remote(long offset, long length) => new(RegionAddress + (ulong)offset, (ulong)length);

    public void Kill() => _process.Kill(entireProcessTree: true);

    public void Signal(string signal)
    {
        using var kill = Process.Start("kill", ["-" + signal, _process.Id.ToString(CultureInfo.InvariantCulture)]);
        kill!.WaitForExit();
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            try
            {
                await _process.StandardInput.WriteLineAsync("QUIT");
                await _process.StandardInput.FlushAsync();
                await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(10));
            }
            catch (Exception e) when (e is IOException or TimeoutException or InvalidOperationException)
            {
                _process.Kill(entireProcessTree: true);
            }
        }
        _process.Dispose();
    }
}
