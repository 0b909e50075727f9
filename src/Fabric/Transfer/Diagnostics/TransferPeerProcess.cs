using System.Diagnostics;
using System.Globalization;

namespace KvFabric.Transfer.Diagnostics;

/// <summary>
/// Starts `kvfabric peer` as a separate process and drives its line protocol: the remote side of the multi-process
/// tests and of `kvfabric-bench transfer`. Every reply is awaited with a deadline.
/// </summary>
public sealed class TransferPeerProcess : IAsyncDisposable
{
    private readonly Process _process;

    private TransferPeerProcess(Process process, byte[] metadata, ulong regionAddress, TimeSpan replyTimeout)
    {
        _process = process;
        Metadata = metadata;
        RegionAddress = regionAddress;
        ReplyTimeout = replyTimeout;
    }

    public byte[] Metadata { get; private set; }
    public ulong RegionAddress { get; }
    public TimeSpan ReplyTimeout { get; }
    public int Pid => _process.Id;
    public bool HasExited => _process.HasExited;

    /// <summary>The kvfabric.dll next to the running program (tests and the bench reference the Fabric project).</summary>
    public static string DefaultDll => Path.Combine(AppContext.BaseDirectory, "kvfabric.dll");

    public static async Task<TransferPeerProcess> StartAsync(long regionMib, bool shm, IEnumerable<string>? extraArgs = null, TimeSpan? replyTimeout = null,
        IReadOnlyDictionary<string, string>? environment = null)
    {
        string dll = DefaultDll;
        if (!File.Exists(dll))
            throw new FileNotFoundException($"{dll} is missing: build the solution (the peer runs the kvfabric executable)", dll);
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
        foreach (var (key, value) in environment ?? new Dictionary<string, string>())
            psi.Environment[key] = value;
        foreach (string a in extraArgs ?? [])
            psi.ArgumentList.Add(a);
        var timeout = replyTimeout ?? TimeSpan.FromSeconds(60);
        var p = Process.Start(psi) ?? throw new InvalidOperationException("could not start 'dotnet' for the peer process; is the .NET SDK on PATH?");
        string ready = await ReadLineAsync(p, timeout).ConfigureAwait(false);
        var parts = ready.Split(' ');
        if (parts is not ["READY", _, _])
        {
            if (!p.HasExited)
                p.Kill(entireProcessTree: true);
            string err = await p.StandardError.ReadToEndAsync().ConfigureAwait(false);
            // The exit status says how it ended (a signal shows as 128 + its number) when its output does not.
            bool exited = p.WaitForExit(5000);
            string status = exited ? $"exit status {p.ExitCode}" : "still running after a kill";
            p.Dispose();
            throw new InvalidOperationException($"the peer process did not start: '{ready}', {status}; stderr: {err}");
        }
        return new TransferPeerProcess(p, Convert.FromBase64String(parts[1]), ulong.Parse(parts[2], CultureInfo.InvariantCulture), timeout);
    }

    private static async Task<string> ReadLineAsync(Process p, TimeSpan timeout)
    {
        try
        {
            string? line = await p.StandardOutput.ReadLineAsync().WaitAsync(timeout).ConfigureAwait(false);
            return line ?? $"EOF (exit {(p.HasExited ? p.ExitCode : -1)})";
        }
        catch (TimeoutException)
        {
            return $"no reply within {timeout.TotalSeconds:0} s";
        }
    }

    /// <summary>Sends one command line and returns the reply line (a READY reply also refreshes <see cref="Metadata"/>).</summary>
    public async Task<string> CommandAsync(string command)
    {
        await _process.StandardInput.WriteLineAsync(command).ConfigureAwait(false);
        await _process.StandardInput.FlushAsync().ConfigureAwait(false);
        string reply = await ReadLineAsync(_process, ReplyTimeout).ConfigureAwait(false);
        if (reply.StartsWith("READY ", StringComparison.Ordinal))
            Metadata = Convert.FromBase64String(reply.Split(' ')[1]);
        return reply;
    }

    public MemoryDescriptor Remote(long offset, long length) => new(RegionAddress + (ulong)offset, (ulong)length);

    public void Kill() => _process.Kill(entireProcessTree: true);

    public Task WaitForExitAsync() => _process.WaitForExitAsync().WaitAsync(ReplyTimeout);

    /// <summary>Sends a POSIX signal (STOP, CONT, ...) to freeze or resume the peer.</summary>
    public void Signal(string signal)
    {
        using var kill = Process.Start("kill", ["-" + signal, _process.Id.ToString(CultureInfo.InvariantCulture)]);
        kill?.WaitForExit();
    }

    public async ValueTask DisposeAsync()
    {
        if (!_process.HasExited)
        {
            try
            {
                await _process.StandardInput.WriteLineAsync("QUIT").ConfigureAwait(false);
                await _process.StandardInput.FlushAsync().ConfigureAwait(false);
                await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(10)).ConfigureAwait(false);
            }
            catch (Exception e) when (e is IOException or TimeoutException or InvalidOperationException)
            {
                _process.Kill(entireProcessTree: true);
            }
        }
        _process.Dispose();
    }
}
