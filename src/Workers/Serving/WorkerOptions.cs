using System.Net;
using KvFabric.Transfer;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Serving;

/// <summary>What a worker does: prefill (compute the prompt's KV and hand it off), decode (receive it and generate), or both in one process (the colocated baseline).</summary>
public enum WorkerRole
{
    Prefill,
    Decode,
    Colocated,
}

/// <summary>A worker process's configuration (flags of `kvfabric-worker serve`; docs/workers.md).</summary>
public sealed record WorkerOptions
{
    public WorkerRole Role { get; init; } = WorkerRole.Prefill;
    /// <summary>Unique among the deployment's workers; the router maps Route's worker names to workers by it.</summary>
    public string Name { get; init; } = "worker";
    public IPAddress Listen { get; init; } = IPAddress.Loopback;
    /// <summary>gRPC port; 0 picks a free one (the READY line says which).</summary>
    public int Port { get; init; }
    /// <summary>The sidecar (prefill and colocated roles): http://host:port.</summary>
    public string? Sidecar { get; init; }
    public string Tenant { get; init; } = "dev";
    public string Token { get; init; } = "dev";
    /// <summary>tiny, small or default (<see cref="ModelConfigs"/>).</summary>
    public string Model { get; init; } = "small";
    /// <summary>Compute threads of the model (0: one per CPU the process may use).</summary>
    public int Threads { get; init; } = 1;
    /// <summary>Blocks of the worker's KV pool (every active request's cache comes from it).</summary>
    public int KvBlocks { get; init; } = 4096;
    /// <summary>Decode: registered slots the prefill side WRITEs into.</summary>
    public int HandoffSlots { get; init; } = 2048;
    /// <summary>Decode: most sequences decoded per step.</summary>
    public int MaxBatch { get; init; } = 16;
    /// <summary>Prefill: requests waiting for the compute beyond this are refused with RESOURCE_EXHAUSTED.</summary>
    public int MaxQueued { get; init; } = 64;
    public TimeSpan HandoffLease { get; init; } = TimeSpan.FromSeconds(60);
    /// <summary>Prefill: transfer attempts of a hand-off (a failed checksum or a peer error is retried; the receiver never sees a bad one).</summary>
    public int HandoffAttempts { get; init; } = 3;
    public BackendKind Backend { get; init; } = BackendKind.Auto;
    /// <summary>Checksum of every hand-off, verified where the bytes land before the notification is delivered.</summary>
    public ChecksumKind Checksum { get; init; } = ChecksumKind.XxHash3;
    /// <summary>Fault injection (tests): corrupt the Nth payload this worker's agent sends.</summary>
    public int CorruptNthPayload { get; init; }
    /// <summary>Fault injection (tests): sleep this long after every decode step, as a slow accelerator would take (0: none).</summary>
    public TimeSpan DecodeStepDelay { get; init; }
    /// <summary>
    /// Graceful shutdown (SIGTERM, DisposeAsync): how long running Prefill, Decode and Generate calls may take to finish
    /// while new calls are refused with UNAVAILABLE; whatever still runs after it ends with UNAVAILABLE too (retryable).
    /// </summary>
    public TimeSpan DrainTimeout { get; init; } = TimeSpan.FromSeconds(10);

    public WorkerOptions Validate()
    {
        if (string.IsNullOrWhiteSpace(Name))
            throw new ArgumentException("the worker needs a name (--name): the router maps the index's worker names to workers by it");
        if (Role != WorkerRole.Decode && string.IsNullOrWhiteSpace(Sidecar))
            throw new ArgumentException($"a {Role.ToString().ToLowerInvariant()} worker needs its sidecar's address (--sidecar http://host:port)");
        if (KvBlocks < 1 || HandoffSlots < 1 || MaxBatch < 1 || MaxQueued < 1 || HandoffAttempts < 1)
            throw new ArgumentException("kv-blocks, handoff-slots, max-batch, max-queued and handoff-attempts must be at least 1");
        if (DrainTimeout < TimeSpan.Zero || DrainTimeout > TimeSpan.FromHours(1))
            throw new ArgumentException($"the drain period (--drain-seconds) is {DrainTimeout.TotalSeconds} s; give 0 (end running calls at once) to 3600");
        if (DecodeStepDelay < TimeSpan.Zero || DecodeStepDelay > TimeSpan.FromSeconds(10))
            throw new ArgumentException($"--decode-step-delay-ms is {DecodeStepDelay.TotalMilliseconds} ms; give 0 to 10000");
        _ = ModelConfigs.Get(Model);
        return this;
    }
}

/// <summary>The model shapes workers can run; every process of a deployment must use the same one (its fingerprint is in every block hash).</summary>
public static class ModelConfigs
{
    /// <summary>Unit tests: runs in microseconds.</summary>
    public static ModelConfig Tiny => ModelConfig.Tiny;

    /// <summary>The demo's shape: small enough that a 2-core machine prefills a 1k-token prompt in well under a second.</summary>
    public static ModelConfig Small { get; } = new()
    {
        Vocab = 2048, DModel = 128, Layers = 4, Heads = 4, KvHeads = 2, HeadDim = 32, Ffn = 384, TokensPerBlock = 16, MaxPositions = 4096,
        ChunkTokens = 128,
    };

    public static ModelConfig Get(string name) => name switch
    {
        "tiny" => Tiny,
        "small" => Small,
        "default" => ModelConfig.Default,
        _ => throw new ArgumentException($"unknown model '{name}': use tiny, small or default"),
    };
}
