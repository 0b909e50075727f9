using System.Diagnostics;
using System.Text;

namespace KvFabric.Sidecar;

/// <summary>
/// Runs one of this project's services as a separate process (`kvfabric serve`, a `kvfabric-worker serve`) and waits for
/// its READY line, whose key=value fields it keeps (integration tests, the perf suite, the demo). Configuration goes in
/// as flags and KVFABRIC_* environment variables, as an operator would give it.
/// </summary>
public sealed class ServiceProcess : IAsyncDisposable
{
    private readonly Process _process;
    private readonly StringBuilder _log;

    private ServiceProcess(Process process, StringBuilder log, IReadOnlyDictionary<string, string> fields)
    {
        _process = process;
        _log = log;
        Fields = fields;
        GrpcAddress = fields["grpc"];
        MetricsAddress = fields.GetValueOrDefault("metrics", "off");
    }

    /// <summary>The key=value fields of the READY line.</summary>
    public IReadOnlyDictionary<string, string> Fields { get; }

    /// <summary>e.g. "http://127.0.0.1:41234".</summary>
    public string GrpcAddress { get; }
    /// <summary>e.g. "127.0.0.1:41235", or "off".</summary>
    public string MetricsAddress { get; }
    public int Pid => _process.Id;
    public bool HasExited => _process.HasExited;

    /// <summary>What the process wrote so far (stdout and stderr), for failure messages.</summary>
    public string Log
    {
        get
        {
            lock (_log)
                return _log.ToString();
        }
    }

    /// <summary>Starts `kvfabric serve` (a sidecar) with args.</summary>
    public static Task<ServiceProcess> StartAsync(IEnumerable<string> args, IReadOnlyDictionary<string, string>? environment = null,
        TimeSpan? startTimeout = null) => StartAsync("kvfabric.dll", "serve", args, environment, startTimeout);

    /// <summary>
    /// Starts `dotnet {dll} {verb} {args}` (dll next to this assembly) and waits for its "READY grpc=... " line.
    /// cpus, when given, pins the process to those CPUs (sched_setaffinity) as soon as it starts.
    /// </summary>
    public static async Task<ServiceProcess> StartAsync(string dllName, string verb, IEnumerable<string> args,
        IReadOnlyDictionary<string, string>? environment = null, TimeSpan? startTimeout = null, IReadOnlyList<int>? cpus = null)
    {
        string dll = Path.Combine(AppContext.BaseDirectory, dllName);
        if (!File.Exists(dll))
            throw new FileNotFoundException($"{dll} is missing: build the solution (this runs the {Path.GetFileNameWithoutExtension(dllName)} executable)", dll);
        // Pinned through taskset (util-linux): every thread of the process inherits the CPU set from its first instruction.
        bool pin = cpus is { Count: > 0 };
        var psi = new ProcessStartInfo(pin ? "taskset" : "dotnet") { RedirectStandardOutput = true, RedirectStandardError = true, UseShellExecute = false };
        if (pin)
        {
            psi.ArgumentList.Add("--cpu-list");
            psi.ArgumentList.Add(string.Join(',', cpus!));
            psi.ArgumentList.Add("dotnet");
        }

        psi.ArgumentList.Add(dll);
        psi.ArgumentList.Add(verb);
        foreach (string a in args)
            psi.ArgumentList.Add(a);
        foreach (var (k, v) in environment ?? new Dictionary<string, string>())
            psi.Environment[k] = v;
        var p = Process.Start(psi) ?? throw new InvalidOperationException($"could not start '{psi.FileName}'; are the .NET SDK (and, to pin CPUs, util-linux's taskset) on PATH?");
        var ready = new TaskCompletionSource<string>(TaskCreationOptions.RunContinuationsAsynchronously);
        var log = new StringBuilder();
        p.OutputDataReceived += (_, e) =>
        {
            if (e.Data is null)
            {
                ready.TrySetResult("EOF");
                return;
            }

            lock (log)
                log.AppendLine(e.Data);
            if (e.Data.StartsWith("READY ", StringComparison.Ordinal))
                ready.TrySetResult(e.Data);
        };
        p.ErrorDataReceived += (_, e) =>
        {
            if (e.Data is null)
                return;
            lock (log)
                log.AppendLine(e.Data);
        };
        p.BeginOutputReadLine();
        p.BeginErrorReadLine();

        TimeSpan timeout = startTimeout ?? TimeSpan.FromSeconds(60);
        string line;
        try
        {
            line = await ready.Task.WaitAsync(timeout).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            line = $"no READY line within {timeout.TotalSeconds:0} s";
        }

        var fields = line.Split(' ').Skip(1).Select(f => f.Split('=', 2)).Where(f => f.Length == 2).ToDictionary(f => f[0], f => f[1]);
        if (!fields.ContainsKey("grpc"))
        {
            if (!p.HasExited)
                p.Kill(entireProcessTree: true);
            await p.WaitForExitAsync().ConfigureAwait(false);
            string text;
            lock (log)
                text = log.ToString();
            p.Dispose();
            throw new InvalidOperationException($"{Path.GetFileNameWithoutExtension(dllName)} {verb} did not start ({line}); its output:\n{text}");
        }

        return new ServiceProcess(p, log, fields);
    }

    /// <summary>Asks the process to stop (SIGTERM) and waits, bounded; kills it if it does not exit in time.</summary>
    public async Task<int> StopAsync(TimeSpan? timeout = null)
    {
        if (!_process.HasExited)
        {
            Native.Libc.Kill(_process.Id, Native.Libc.SIGTERM);
            using var cts = new CancellationTokenSource(timeout ?? TimeSpan.FromSeconds(15));
            try
            {
                await _process.WaitForExitAsync(cts.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException)
            {
                _process.Kill(entireProcessTree: true);
                await _process.WaitForExitAsync().ConfigureAwait(false);
            }
        }

        return _process.ExitCode;
    }

    /// <summary>Kills the process at once (SIGKILL): no cleanup, no lease revoked, as in a crash.</summary>
    public async Task KillAsync()
    {
        if (!_process.HasExited)
        {
            Native.Libc.Kill(_process.Id, Native.Libc.SIGKILL);
            await _process.WaitForExitAsync().WaitAsync(TimeSpan.FromSeconds(30)).ConfigureAwait(false);
        }
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync().ConfigureAwait(false);
        _process.Dispose();
    }
}
