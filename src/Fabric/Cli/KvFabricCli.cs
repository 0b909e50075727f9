using System.CommandLine;
using System.Globalization;
using KvFabric.Sidecar;
using Microsoft.Extensions.Configuration;
using System.Net;
using System.Runtime.InteropServices;
using KvFabric.Memory;
using KvFabric.Tiers.Ssd;
using KvFabric.Transfer.Diagnostics;

namespace KvFabric.Cli;

/// <summary>The `kvfabric` command line: parses options and composes library parts; no logic of its own.</summary>
public static class KvFabricCli
{
    public static async Task<int> RunAsync(string[] args)
    {
        var root = new RootCommand("KvFabric: KV-cache transfer and tiered storage fabric for disaggregated LLM inference.");
        root.Subcommands.Add(ServeCommand());
        root.Subcommands.Add(PeerCommand());
        root.Subcommands.Add(ShmCleanCommand());
        root.Subcommands.Add(ClientCommands.Create());
        root.Subcommands.Add(SsdWriterCommand());
        ParseResult parsed = root.Parse(args);
        // System.CommandLine's own SIGTERM/Ctrl-C handling returns (exit 143/130) 2 s after the signal whether or not the
        // action finished, which cut `serve` off in its drain before it closed the SSD tier and removed its shared-memory
        // segments; and a SIGTERM soon after READY could come before it had registered. `serve` handles the signals itself;
        // its drain is bounded (shutdown_drain_s plus a grace for calls, DisposeMoveTimeout for a tier move).
        bool serve = parsed.CommandResult.Command.Name == "serve";
        return await parsed.InvokeAsync(serve ? new InvocationConfiguration { ProcessTerminationTimeout = null } : null);
    }

    private static Command PeerCommand()
    {
        var name = new Option<string>("--name") { Description = "agent name", DefaultValueFactory = _ => "peer" };
        var regionMib = new Option<long>("--region-mib") { Description = "size of the registered region in MiB", DefaultValueFactory = _ => 64 };
        var shm = new Option<bool>("--shm") { Description = "place the region in a /dev/shm segment (reachable by the shared-memory backend)" };
        var listen = new Option<string>("--listen") { Description = "address the TCP backend binds", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "TCP port (0: any free port)" };
        var corrupt = new Option<int>("--corrupt-nth-payload") { Description = "fault injection: corrupt one byte of the Nth payload sent (tests only)" };
        var ucx = new Option<bool>("--ucx") { Description = "also start a UCX worker and advertise it (fails if libucp cannot be initialised)" };
        var ucxAlloc = new Option<bool>("--ucx-alloc") { Description = "let UCX allocate the region (one-copy puts on UCX's posix/sysv transports); needs --ucx" };
        var cmd = new Command("peer", "Run a standalone transfer agent with one region, driven by a line protocol on stdin (see docs/transfer.md).")
        {
            name, regionMib, shm, listen, port, corrupt, ucx, ucxAlloc,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            long mib = parse.GetValue(regionMib);
            if (mib <= 0)
                throw new ArgumentOutOfRangeException(nameof(regionMib), mib, "--region-mib must be positive");
            await using var peer = new TransferPeer(new TransferPeerOptions
            {
                Name = parse.GetValue(name)!,
                RegionBytes = mib << 20,
                Shared = parse.GetValue(shm),
                Listen = IPAddress.Parse(parse.GetValue(listen)!),
                Port = parse.GetValue(port),
                CorruptNthPayload = parse.GetValue(corrupt),
                Ucx = parse.GetValue(ucx),
                UcxAllocate = parse.GetValue(ucxAlloc),
            });
            return await peer.RunAsync(Console.In, Console.Out);
        });
        return cmd;
    }

    private static Command ServeCommand()
    {
        var config = new Option<FileInfo?>("--config") { Description = "JSON configuration file (keys in docs/operations.md)" };
        var port = new Option<int?>("--port") { Description = "gRPC port (h2c, or TLS with --tls-cert); 0 picks a free port" };
        var metricsPort = new Option<int?>("--metrics-port") { Description = "Prometheus /metrics port; 0 picks a free port, -1 turns it off" };
        var listen = new Option<string?>("--listen") { Description = "address to bind (default 127.0.0.1)" };
        var dev = new Option<bool>("--dev") { Description = "development mode: tenant 'dev' with token 'dev'; binds loopback only" };
        var node = new Option<string?>("--node") { Description = "this node's name (default: the host name)" };
        var worker = new Option<string?>("--worker") { Description = "the inference worker this sidecar serves" };
        var capacity = new Option<string?>("--host-capacity") { Description = "host tier capacity, e.g. 4GiB" };
        var transferPort = new Option<int?>("--transfer-port") { Description = "TCP port of the transfer agent (0: any)" };
        var tlsCert = new Option<string?>("--tls-cert") { Description = "PEM certificate: serve gRPC over TLS" };
        var tlsKey = new Option<string?>("--tls-key") { Description = "PEM private key of --tls-cert" };
        var logFormat = new Option<string?>("--log-format") { Description = "text (default) or json (one object per line)" };
        var gpuCapacity = new Option<string?>("--gpu-capacity") { Description = "GPU tier capacity (emulated in host memory when no GPU is present); default none" };
        var ssdDir = new Option<string?>("--ssd-dir") { Description = "directory of the SSD tier (survives restarts); default none" };
        var ssdCapacity = new Option<string?>("--ssd-capacity") { Description = "SSD tier capacity, e.g. 64GiB" };
        var policy = new Option<string?>("--policy") { Description = "eviction policy of the GPU and host tiers: lru or cost (default)" };
        var cluster = new Option<string?>("--cluster") { Description = "cluster store: none (standalone, default), inproc, or etcd" };
        var etcd = new Option<string?>("--etcd") { Description = "etcd client URL, e.g. http://127.0.0.1:2379 (with --cluster etcd)" };
        var leaseTtl = new Option<double?>("--lease-ttl") { Description = "seconds the node's cluster lease outlives its last keepalive (default 5)" };
        var cmd = new Command("serve", "Run the sidecar: gRPC API (kvfabric.v1 Fabric, Index, Transfer; grpc.health.v1; grpc.reflection), metrics, transfer agent.")
        {
            config, port, metricsPort, listen, dev, node, worker, capacity, transferPort, tlsCert, tlsKey, logFormat, gpuCapacity, ssdDir, ssdCapacity, policy, cluster, etcd, leaseTtl,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            var flags = new Dictionary<string, string?>
            {
                ["port"] = parse.GetValue(port)?.ToString(CultureInfo.InvariantCulture),
                ["metrics_port"] = parse.GetValue(metricsPort)?.ToString(CultureInfo.InvariantCulture),
                ["listen"] = parse.GetValue(listen),
                ["dev"] = parse.GetValue(dev) ? "true" : null,
                ["node"] = parse.GetValue(node),
                ["worker"] = parse.GetValue(worker),
                ["host_capacity"] = parse.GetValue(capacity),
                ["transfer_port"] = parse.GetValue(transferPort)?.ToString(CultureInfo.InvariantCulture),
                ["tls:certificate"] = parse.GetValue(tlsCert),
                ["tls:key"] = parse.GetValue(tlsKey),
                ["log_format"] = parse.GetValue(logFormat),
                ["gpu_capacity"] = parse.GetValue(gpuCapacity),
                ["ssd_dir"] = parse.GetValue(ssdDir),
                ["ssd_capacity"] = parse.GetValue(ssdCapacity),
                ["policy"] = parse.GetValue(policy),
                ["cluster"] = parse.GetValue(cluster),
                ["etcd_endpoint"] = parse.GetValue(etcd),
                ["cluster_lease_ttl_s"] = parse.GetValue(leaseTtl)?.ToString(CultureInfo.InvariantCulture),
            };
            var builder = new ConfigurationBuilder();
            if (parse.GetValue(config) is { } file)
            {
                if (!file.Exists)
                    return await FailAsync($"--config {file.FullName} does not exist (or is not a file this user can see)", 2);
                builder.AddJsonFile(file.FullName, optional: false);
            }

            SidecarOptions options;
            try
            {
                IConfiguration configuration = builder
                    .AddEnvironmentVariables("KVFABRIC_")
                    .AddInMemoryCollection(flags.Where(kv => kv.Value is not null))
                    .Build();
                options = SidecarOptions.From(configuration).Validate();
            }
            catch (ArgumentException e)
            {
                return await FailAsync(e.Message, 2);
            }
            catch (InvalidDataException e)
            {
                // A config file that is not JSON (or cannot be read): the inner exception says where.
                return await FailAsync($"{e.Message} {e.InnerException?.InnerException?.Message ?? e.InnerException?.Message} Fix the file given to --config.", 2);
            }

            // SIGTERM and Ctrl-C, handled from before anything starts. With System.CommandLine's handler, a SIGTERM right
            // after READY often found it not yet registered and went to the web hosts' console lifetimes alone, which
            // swallow it (the process hung until SIGKILL). Held in a static field, so no collection can finalize them.
            var stop = CancellationTokenSource.CreateLinkedTokenSource(ct); // not disposed: a late second signal still cancels it
            StopSignals = [.. new[] { PosixSignal.SIGTERM, PosixSignal.SIGINT }.Select(signal => PosixSignalRegistration.Create(signal, context =>
            {
                context.Cancel = true; // this action stops the host and returns; the process then exits 0
                stop.Cancel();
            }))];
            ct = stop.Token;
            SidecarHost? started = null;
            try
            {
                started = new SidecarHost(options);
                await started.StartAsync(ct);
            }
            catch (Exception e)
            {
                // Whatever stopped the start (a signal during a long SSD recovery included), what was built is released.
                if (started is not null)
                    await started.DisposeAsync();
                if (e is OperationCanceledException && ct.IsCancellationRequested)
                    return await FailAsync("stopped (SIGTERM or Ctrl-C) before it was ready", 1);
                if (e is not (IOException or UnauthorizedAccessException or ArgumentException or InvalidOperationException
                        or System.Net.Sockets.SocketException or System.Security.Cryptography.CryptographicException or KvFabric.Transfer.TransferException))
                    throw;
                // A port in use, an SSD directory this user cannot write, /dev/shm full: what failed, without a stack trace.
                return await FailAsync($"could not start: {e.Message}{(e.InnerException is { } inner ? " (" + inner.Message + ")" : string.Empty)}", 1);
            }

            await using SidecarHost host = started;

            // The line scripts and tests wait for: where everything listens.
            Console.WriteLine($"READY grpc={(host.Tls ? "https" : "http")}://{host.GrpcEndpoint} metrics={host.MetricsEndpoint?.ToString() ?? "off"} transfer={host.Agent.TcpEndpoint}");
            try
            {
                await Task.Delay(Timeout.Infinite, ct);
            }
            catch (OperationCanceledException)
            {
            }

            await host.StopAsync();
            return 0;
        });
        return cmd;
    }

    /// <summary>`serve`'s SIGTERM and SIGINT handlers, for the life of the process.</summary>
    private static PosixSignalRegistration[]? StopSignals;

    private static async Task<int> FailAsync(string message, int exitCode)
    {
        await Console.Error.WriteLineAsync("kvfabric serve: " + message);
        return exitCode;
    }

    private static Command ShmCleanCommand()
    {
        var cmd = new Command("shm-clean", "Remove KvFabric shared-memory segments whose owning process is gone.");
        cmd.SetAction(_ =>
        {
            Console.WriteLine($"removed {SharedMemorySegment.RemoveStale()} stale segment(s) from {SharedMemorySegment.Directory}");
            return 0;
        });
        return cmd;
    }

    // Hidden: the child process of the SSD crash tests (tests/KvFabric.Tests/Tiers/SsdCrashTests.cs).
    private static Command SsdWriterCommand()
    {
        var dir = new Option<string>("--dir") { Description = "the SSD tier's directory", Required = true };
        var first = new Option<int>("--first") { Description = "number of the first block written" };
        var blocks = new Option<int>("--blocks") { Description = "blocks to write", DefaultValueFactory = _ => 1000 };
        var blockBytes = new Option<int>("--block-bytes") { Description = "bytes per block", DefaultValueFactory = _ => 64 << 10 };
        var capacityMib = new Option<long>("--capacity-mib") { Description = "tier capacity in MiB", DefaultValueFactory = _ => 1024 };
        var concurrency = new Option<int>("--concurrency") { Description = "concurrent writers (group commit)", DefaultValueFactory = _ => 4 };
        var cmd = new Command("ssd-writer", "Write numbered pattern blocks to an SSD tier, printing DURABLE i per acknowledged block (crash tests).")
        {
            dir, first, blocks, blockBytes, capacityMib, concurrency,
        };
        cmd.Hidden = true;
        cmd.SetAction((parse, ct) =>
        {
            var options = SsdWriterTool.Options(parse.GetValue(dir)!, parse.GetValue(blockBytes), parse.GetValue(capacityMib) << 20);
            return SsdWriterTool.RunAsync(options, parse.GetValue(first), parse.GetValue(blocks), parse.GetValue(concurrency), Console.Out, ct);
        });
        return cmd;
    }
}
