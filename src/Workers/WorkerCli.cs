using System.CommandLine;
using System.Net;
using KvFabric.Transfer;
using KvFabric.Workers.Driver;
using KvFabric.Workers.Serving;
using Microsoft.Extensions.Logging;

namespace KvFabric.Workers;

/// <summary>The `kvfabric-worker` command line: `serve` runs one worker process, `demo` the single-machine deployment (the main job).</summary>
public static class WorkerCli
{
    public static async Task<int> RunAsync(string[] args)
    {
        var root = new RootCommand("KvFabric workers: prefill and decode workers on a small CPU transformer, disaggregated through the fabric.");
        root.Subcommands.Add(ServeCommand());
        root.Subcommands.Add(DemoCommand());
        ParseResult parsed = root.Parse(args);
        // System.CommandLine's own SIGTERM/Ctrl-C handling returns (exit 143/130) 2 s after the signal whether or not the
        // action finished; `serve` handles the signals itself, from before it starts, and stops within its own bounds.
        bool serve = parsed.CommandResult.Command.Name == "serve";
        return await parsed.InvokeAsync(serve ? new InvocationConfiguration { ProcessTerminationTimeout = null } : null);
    }

    private static Command ServeCommand()
    {
        var role = new Option<string>("--role") { Description = "prefill, decode or colocated", DefaultValueFactory = _ => "prefill" };
        var name = new Option<string>("--name") { Description = "the worker's name (the index's worker name of its sidecar, for routing)", DefaultValueFactory = _ => "worker" };
        var listen = new Option<string>("--listen") { Description = "address to bind", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "gRPC port (0: any free one; the READY line says which)" };
        var sidecar = new Option<string?>("--sidecar") { Description = "the sidecar's gRPC address, http://host:port (prefill and colocated)" };
        var tenant = new Option<string>("--tenant") { DefaultValueFactory = _ => "dev" };
        var token = new Option<string>("--token") { DefaultValueFactory = _ => "dev" };
        var model = new Option<string>("--model") { Description = "tiny, small or default", DefaultValueFactory = _ => "small" };
        var threads = new Option<int>("--threads") { Description = "compute threads (0: one per CPU)", DefaultValueFactory = _ => 1 };
        var kvBlocks = new Option<int>("--kv-blocks") { Description = "blocks in the worker's KV pool", DefaultValueFactory = _ => 4096 };
        var slots = new Option<int>("--handoff-slots") { Description = "decode: registered hand-off slots", DefaultValueFactory = _ => 2048 };
        var maxBatch = new Option<int>("--max-batch") { Description = "decode: most sequences per step", DefaultValueFactory = _ => 16 };
        var maxQueued = new Option<int>("--max-queued") { Description = "prefill: prefills waiting for the compute beyond this are refused with RESOURCE_EXHAUSTED", DefaultValueFactory = _ => 64 };
        var transfer = new Option<string>("--transfer") { Description = "hand-off backend: auto, tcp, shm or ucx (ucx: needs libucx0 on every worker; UCX_TLS picks its transports)", DefaultValueFactory = _ => "auto" };
        var corrupt = new Option<int>("--corrupt-nth-payload") { Description = "fault injection (tests): corrupt the Nth payload this worker sends" };
        var stepDelay = new Option<int>("--decode-step-delay-ms") { Description = "fault injection (tests): sleep this long after every decode step (a slow accelerator)" };
        var drain = new Option<double>("--drain-seconds") { Description = "on SIGTERM: seconds running calls get to finish (new calls are refused with UNAVAILABLE); calls still running then end with UNAVAILABLE", DefaultValueFactory = _ => 10 };
        var cmd = new Command("serve", "Run one worker (prints READY grpc=... when serving; SIGTERM stops it).")
        {
            role, name, listen, port, sidecar, tenant, token, model, threads, kvBlocks, slots, maxBatch, maxQueued, transfer, corrupt, stepDelay, drain,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            WorkerOptions options;
            try
            {
                options = new WorkerOptions
                {
                    Role = parse.GetValue(role) switch
                    {
                        "prefill" => WorkerRole.Prefill,
                        "decode" => WorkerRole.Decode,
                        "colocated" => WorkerRole.Colocated,
                        var r => throw new ArgumentException($"--role must be prefill, decode or colocated; got '{r}'"),
                    },
                    Name = parse.GetValue(name)!, Listen = IPAddress.Parse(parse.GetValue(listen)!), Port = parse.GetValue(port),
                    Sidecar = parse.GetValue(sidecar), Tenant = parse.GetValue(tenant)!, Token = parse.GetValue(token)!, Model = parse.GetValue(model)!,
                    Threads = parse.GetValue(threads), KvBlocks = parse.GetValue(kvBlocks), HandoffSlots = parse.GetValue(slots), MaxBatch = parse.GetValue(maxBatch),
                    MaxQueued = parse.GetValue(maxQueued),
                    Backend = parse.GetValue(transfer) switch
                    {
                        "auto" => BackendKind.Auto,
                        "tcp" => BackendKind.Tcp,
                        "shm" => BackendKind.SharedMemory,
                        "ucx" => BackendKind.Ucx,
                        var t => throw new ArgumentException($"--transfer must be auto, tcp, shm or ucx; got '{t}'"),
                    },
                    CorruptNthPayload = parse.GetValue(corrupt),
                    DecodeStepDelay = TimeSpan.FromMilliseconds(parse.GetValue(stepDelay)),
                    DrainTimeout = Seconds(parse.GetValue(drain), "--drain-seconds"),
                }.Validate();
            }
            catch (Exception e) when (e is ArgumentException or FormatException)
            {
                await Console.Error.WriteLineAsync($"kvfabric-worker serve: {e.Message}").ConfigureAwait(false);
                return 2;
            }

            using ILoggerFactory logs = LoggerFactory.Create(b =>
            {
                b.AddFilter("Microsoft", LogLevel.Warning);
                b.AddSimpleConsole(o => { o.SingleLine = true; o.TimestampFormat = "HH:mm:ss.fff "; o.UseUtcTimestamp = true; });
            });
            // SIGTERM and Ctrl-C are handled from before the server starts: registered only after READY, a signal in
            // between went to the web host's console lifetime alone, which swallows it (the process ran on until killed).
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(ct);
            using var sigterm = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGTERM, c =>
            {
                c.Cancel = true; // the action stops the server and returns; the process then exits 0
                stop.Cancel();
            });
            using var sigint = System.Runtime.InteropServices.PosixSignalRegistration.Create(System.Runtime.InteropServices.PosixSignal.SIGINT, c =>
            {
                c.Cancel = true;
                stop.Cancel();
            });
            await using var server = new WorkerServer(options, logs);
            try
            {
                await server.StartAsync(stop.Token).ConfigureAwait(false);
                Console.WriteLine($"READY grpc=http://{server.Endpoint} name={options.Name} role={options.Role.ToString().ToLowerInvariant()} agent={server.AgentId}");
                await Task.Delay(Timeout.Infinite, stop.Token).ConfigureAwait(false);
            }
            catch (OperationCanceledException) when (stop.IsCancellationRequested)
            {
                // stopping: the server is disposed on the way out
            }

            return 0;
        });
        return cmd;
    }

    /// <summary>A flag in seconds as a TimeSpan; NaN or infinity is refused with the flag's name (TimeSpan.FromSeconds would throw its own message).</summary>
    private static TimeSpan Seconds(double value, string flag) =>
        double.IsFinite(value) && Math.Abs(value) <= 86_400 ? TimeSpan.FromSeconds(value) : throw new ArgumentException($"{flag} is {value}; give a number of seconds (0 to 3600)");

    private static Command DemoCommand()
    {
        var requests = new Option<int>("--requests") { DefaultValueFactory = _ => 24 };
        var prompt = new Option<int>("--prompt-tokens") { Description = "prompt length (the longest, for a trace)", DefaultValueFactory = _ => 1024 };
        var shared = new Option<double>("--shared") { Description = "fraction of each prompt shared by all requests (synthetic chats)", DefaultValueFactory = _ => 0.9 };
        var maxNew = new Option<int>("--max-new-tokens") { DefaultValueFactory = _ => 24 };
        var rate = new Option<double>("--rate") { Description = "requests per second (Poisson)", DefaultValueFactory = _ => 4 };
        var trace = new Option<string?>("--trace") { Description = "replay a Mooncake-format trace (JSONL) instead of synthetic chats" };
        var model = new Option<string>("--model") { DefaultValueFactory = _ => "small" };
        var prefill = new Option<int>("--prefill-workers") { DefaultValueFactory = _ => 2 };
        var decode = new Option<int>("--decode-workers") { DefaultValueFactory = _ => 1 };
        var timeScale = new Option<double>("--time-scale") { Description = "a trace's arrival times are multiplied by this (0: back to back)", DefaultValueFactory = _ => 1.0 };
        var inFlight = new Option<int>("--max-in-flight") { Description = "most requests in flight (arrivals beyond wait)", DefaultValueFactory = _ => 4 };
        var output = new Option<string>("--out") { Description = "directory for summary.json and ttft.svg", DefaultValueFactory = _ => "demo-out" };
        var transfer = new Option<string>("--transfer") { Description = "hand-off backend of every worker: auto, tcp, shm or ucx", DefaultValueFactory = _ => "auto" };
        var cmd = new Command("demo", "Start a single-machine disaggregated deployment, replay a workload with and without prefix reuse, check every output, summarize.")
        {
            requests, prompt, shared, maxNew, rate, inFlight, timeScale, trace, model, prefill, decode, output, transfer,
        };
        cmd.SetAction(async (parse, ct) => await Demo.RunAsync(new DemoOptions
        {
            Requests = parse.GetValue(requests), PromptTokens = parse.GetValue(prompt), SharedFraction = parse.GetValue(shared), MaxNewTokens = parse.GetValue(maxNew),
            Rate = parse.GetValue(rate), Trace = parse.GetValue(trace), Model = parse.GetValue(model)!, PrefillWorkers = parse.GetValue(prefill),
            DecodeWorkers = parse.GetValue(decode), MaxInFlight = parse.GetValue(inFlight), TimeScale = parse.GetValue(timeScale), OutputDirectory = parse.GetValue(output)!,
            Transfer = parse.GetValue(transfer)!,
        }, Console.Out, ct).ConfigureAwait(false));
        return cmd;
    }
}
