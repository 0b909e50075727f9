using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using KvFabric.Cluster;

namespace KvFabric.Cluster;

/// <summary>
/// A private etcd server (Debian etcd-server, /usr/bin/etcd, or $KVFABRIC_ETCD) on loopback with free ports and a
/// temporary data dir: for tests, the perf suite and one-machine deployments. A missing etcd is an error naming the fix
/// (scripts/install-prereqs.sh installs it).
/// </summary>
public sealed class EtcdProcess : IAsyncDisposable
{
    private static readonly TimeSpan ReadyDeadline = TimeSpan.FromSeconds(30);
    private readonly string _binary;
    private readonly StringBuilder _output = new();
    private Process? _process;

    private EtcdProcess(string binary, string dataDir, int clientPort, int peerPort)
    {
        _binary = binary;
        DataDir = dataDir;
        ClientPort = clientPort;
        PeerPort = peerPort;
    }

    public string DataDir { get; }
    public int ClientPort { get; }
    public int PeerPort { get; }
    public Uri ClientUrl => new($"http://127.0.0.1:{ClientPort}");

    public static string FindBinary()
    {
        string? configured = Environment.GetEnvironmentVariable("KVFABRIC_ETCD");
        if (!string.IsNullOrEmpty(configured))
        {
            return File.Exists(configured)
                ? configured
                : throw new InvalidOperationException($"KVFABRIC_ETCD={configured} does not exist; point it at an etcd 3.4+ binary or unset it to use /usr/bin/etcd");
        }

        foreach (string dir in (Environment.GetEnvironmentVariable("PATH") ?? "").Split(':').Prepend("/usr/bin"))
        {
            string candidate = Path.Combine(dir, "etcd");
            if (dir.Length > 0 && File.Exists(candidate))
                return candidate;
        }

        throw new InvalidOperationException(
            "etcd is not installed (no /usr/bin/etcd, none on PATH, KVFABRIC_ETCD unset); a KvFabric cluster needs etcd: " +
            "run scripts/install-prereqs.sh as root (it installs the Debian package etcd-server) or set KVFABRIC_ETCD to an etcd binary");
    }

    /// <summary>Starts a fresh etcd (new data dir, free ports) and waits until it serves.</summary>
    /// <param name="dataRoot">Where its data dir goes (default: the temp dir). Tests put it in memory (/dev/shm), so
    /// etcd's WAL fsyncs (a lease revocation is one) do not wait behind other tests' disk writes.</param>
    public static async Task<EtcdProcess> StartAsync(string? dataRoot = null)
    {
        string binary = FindBinary();
        Exception? last = null;
        for (int attempt = 0; attempt < 3; attempt++) // a free port can be taken between probing and etcd's bind
        {
            string dataDir = Path.Combine(dataRoot ?? Path.GetTempPath(), "kvfabric-etcd-" + Guid.NewGuid().ToString("N")[..12]);
            var etcd = new EtcdProcess(binary, dataDir, FreePort(), FreePort());
            try
            {
                await etcd.RestartAsync();
                return etcd;
            }
            catch (InvalidOperationException e)
            {
                last = e;
                await etcd.DisposeAsync();
            }
        }

        throw new InvalidOperationException("etcd did not start in three attempts: " + last?.Message, last);
    }

    /// <summary>Starts etcd (again) on the same ports and data dir and waits until it serves.</summary>
    public async Task RestartAsync()
    {
        if (_process is { HasExited: false })
            throw new InvalidOperationException("etcd is still running; Kill it first");
        _process?.Dispose();
        _process = null;
        lock (_output)
            _output.Clear();
        string peer = $"http://127.0.0.1:{PeerPort}";
        var psi = new ProcessStartInfo(_binary)
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            UseShellExecute = false,
        };
        foreach (string arg in new[]
                 {
                     "--name", "default", "--data-dir", DataDir,
                     "--listen-client-urls", ClientUrl.GetLeftPart(UriPartial.Authority),
                     "--advertise-client-urls", ClientUrl.GetLeftPart(UriPartial.Authority),
                     "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                     "--initial-cluster", "default=" + peer,
                 })
        {
            psi.ArgumentList.Add(arg);
        }

        // Keep the Debian service's environment out of it (ETCD_* variables would override the flags).
        foreach (string name in psi.Environment.Keys.Where(k => k.StartsWith("ETCD_", StringComparison.Ordinal)).ToList())
            psi.Environment.Remove(name);
        if (System.Runtime.InteropServices.RuntimeInformation.OSArchitecture == System.Runtime.InteropServices.Architecture.Arm64)
            psi.Environment["ETCD_UNSUPPORTED_ARCH"] = "arm64"; // etcd 3.4 refuses arm64 without it

        var process = new Process { StartInfo = psi };
        process.OutputDataReceived += (_, e) => Keep(e.Data);
        process.ErrorDataReceived += (_, e) => Keep(e.Data);
        if (!process.Start())
            throw new InvalidOperationException($"could not start {_binary}");
        process.BeginOutputReadLine();
        process.BeginErrorReadLine();
        _process = process;
        await WaitReadyAsync();
    }

    private void Keep(string? line)
    {
        if (line is null)
            return;
        lock (_output)
        {
            _output.AppendLine(line);
            if (_output.Length > 64 * 1024)
                _output.Remove(0, _output.Length - 32 * 1024);
        }
    }

    public string OutputTail
    {
        get
        {
            lock (_output)
            {
                string s = _output.ToString();
                return s.Length > 4000 ? s[^4000..] : s;
            }
        }
    }

    private async Task WaitReadyAsync()
    {
        using var client = new EtcdClient(ClientUrl, TimeSpan.FromSeconds(2));
        var started = Stopwatch.StartNew();
        while (true)
        {
            if (_process!.HasExited)
                throw new InvalidOperationException($"etcd exited with code {_process.ExitCode} while starting (ports {ClientPort}/{PeerPort}); its output:\n{OutputTail}");
            try
            {
                await client.RangeAsync(new KvFabric.Cluster.Etcd.Pb.RangeRequest { Key = Google.Protobuf.ByteString.CopyFromUtf8("/"), CountOnly = true });
                return;
            }
            catch (Exception) when (started.Elapsed < ReadyDeadline)
            {
                await Task.Delay(100);
            }
            catch (Exception e)
            {
                Kill();
                throw new InvalidOperationException($"etcd at {ClientUrl} did not serve within {ReadyDeadline}: {e.Message}; its output:\n{OutputTail}", e);
            }
        }
    }

    /// <summary>Kills etcd at once (SIGKILL) and waits for it to exit; the data dir stays for a restart.</summary>
    public void Kill()
    {
        if (_process is null || _process.HasExited)
            return;
        _process.Kill(entireProcessTree: true);
        if (!_process.WaitForExit(TimeSpan.FromSeconds(20)))
            throw new InvalidOperationException($"etcd (pid {_process.Id}) did not exit within 20 s of SIGKILL");
    }

    private static int FreePort()
    {
        using var listener = new TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        return ((IPEndPoint)listener.LocalEndpoint).Port;
    }

    public ValueTask DisposeAsync()
    {
        Kill();
        _process?.Dispose();
        try
        {
            if (Directory.Exists(DataDir))
                Directory.Delete(DataDir, recursive: true);
        }
        catch (IOException)
        {
            // best effort: a temp dir
        }

        return ValueTask.CompletedTask;
    }
}
