using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using System.Runtime.CompilerServices;
using System.Threading.Channels;
using Google.Protobuf;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Memory;
using KvFabric.Rpc;
using KvFabric.Rpc.V1;
using KvFabric.Transfer;
using KvFabric.Workers.Decode;
using KvFabric.Workers.Handoff;
using KvFabric.Workers.Model;
using KvFabric.Workers.Prefill;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.Logging;
using HandoffTicket = KvFabric.Workers.Handoff.HandoffTicket;
using TicketMessage = KvFabric.Rpc.V1.HandoffReservation;

namespace KvFabric.Workers.Serving;

/// <summary>
/// One worker process's gRPC service (kvfabric.v1.Worker, docs/workers.md) over the model, its KV block pool and its
/// transfer agent. Prefill role: Prefill computes a prompt's KV with prefix reuse through the sidecar and WRITEs it,
/// with a notification, into slots a decode worker reserved (a failed transfer is retried; the receiver never takes a bad
/// one). Decode role: Reserve gives those slots; Decode waits for the notification and streams the generated tokens,
/// batched continuously with the other requests. Colocated role: Generate does both in this process (the baseline).
/// </summary>
public sealed class WorkerServer : IAsyncDisposable
{
    private const string Service = "/kvfabric.v1.Worker/";
    private static readonly TimeSpan MaxHandoffLease = TimeSpan.FromHours(1);
    private readonly WorkerOptions _options;
    private readonly ILogger _log;
    private readonly ILoggerFactory _logs;
    private readonly Transformer _model;
    private readonly HostBlockPool _pool;
    private readonly TransferAgent _agent;
    private readonly FabricClient? _sidecar;
    private readonly PrefillEngine? _prefill;
    private readonly HandoffReceiver? _handoff;
    private readonly DecodeEngine? _decode;
    private readonly DecodeScheduler? _scheduler;
    private readonly SemaphoreSlim _compute = new(1, 1);
    private readonly ConcurrentDictionary<Guid, Lazy<Task<RemoteAgent>>> _remotes = new();
    private byte[] _metadata = [];
    private WebApplication? _app;
    private HealthService? _health;
    // Graceful shutdown: once draining, new calls are refused (UNAVAILABLE); the calls running (_calls) get the drain
    // period to finish, then _drainOver ends them, also as UNAVAILABLE (the client did not cancel: retry elsewhere).
    private readonly CancellationTokenSource _drainOver = new();
    private int _draining, _calls;
    private GrpcDispatcher? _dispatcher;
    private int _active, _queued;
    private long _completed, _failed, _retries, _fallbacks;

    public WorkerServer(WorkerOptions options, ILoggerFactory logs)
    {
        _options = options.Validate();
        _logs = logs;
        _log = logs.CreateLogger("kvfabric.worker");
        _model = new Transformer(ModelConfigs.Get(options.Model), options.Threads);
        // Registered and shared: the prefill side WRITEs straight from the cache's blocks (no staging copy).
        _pool = _model.CreatePool(options.KvBlocks, shared: options.Role == WorkerRole.Prefill);
        _agent = new TransferAgent(new TransferAgentOptions
        {
            Name = options.Name, ListenAddress = options.Listen,
            Faults = options.CorruptNthPayload > 0 ? new TransferFaults { CorruptNthPayload = options.CorruptNthPayload } : null,
            EnableUcx = options.Backend == BackendKind.Ucx,
        });
        if (options.Backend == BackendKind.Ucx && !_agent.UcxAvailable)
        {
            string why = _agent.UcxUnavailableReason ?? "unknown";
            _agent.DisposeAsync().AsTask().GetAwaiter().GetResult();
            _pool.Dispose();
            throw new InvalidOperationException($"--transfer ucx needs UCX (install libucx0; UCX_TLS chooses its transports): {why}");
        }
        if (options.Role != WorkerRole.Decode)
        {
            _sidecar = FabricClient.Connect(options.Sidecar!, options.Tenant, options.Token);
            _prefill = new PrefillEngine(_model, _sidecar, options.Tenant);
        }

        if (options.Role == WorkerRole.Prefill)
            _agent.Register(_pool);
        if (options.Role == WorkerRole.Decode)
        {
            _handoff = new HandoffReceiver(_agent, checked((int)_model.Layout.BlockBytes), options.HandoffSlots, ucxMemory: options.Backend == BackendKind.Ucx);
            _decode = new DecodeEngine(_model, _handoff);
        }

        if (options.Role != WorkerRole.Prefill)
            _scheduler = new DecodeScheduler(_model, options.MaxBatch, stepDelay: options.DecodeStepDelay);
    }

    public IPEndPoint? Endpoint { get; private set; }
    public Guid AgentId => _agent.AgentId;
    public WorkerOptions Options => _options;
    /// <summary>The gRPC methods this worker serves (set by StartAsync): for tests that drive a call in process.</summary>
    internal GrpcRouter? Routes { get; private set; }

    public async Task StartAsync(CancellationToken cancellationToken = default)
    {
        _metadata = _agent.ExportMetadata();
        var router = new GrpcRouter();
        var health = new HealthService([Service.Trim('/')]);
        health.Register(router);
        _health = health;
        new ReflectionService(router, [WorkerReflection.Descriptor, Grpc.Health.V1.HealthReflection.Descriptor]).Register(router);
        router.Unary<WorkerStatusRequest, WorkerStatus>(Service + "Status", WorkerStatusRequest.Parser, (_, _) => Task.FromResult(Status()));
        if (_decode is not null)
        {
            // A ticket whose answer never reached the caller (it reset the stream) would hold its slots for the lease:
            // nobody can WRITE into them, so they come back at once.
            router.Unary<ReserveHandoffRequest, ReserveHandoffResponse>(Service + "Reserve", ReserveHandoffRequest.Parser, (r, _) => Task.FromResult(Reserve(r)),
                undelivered: (r, response, _) => _handoff!.ReleaseUndelivered(r.RequestId, response.Ticket.Nonce));
            router.ServerStreaming<DecodeRequest>(Service + "Decode", DecodeRequest.Parser, (r, call) => DrainedAsync(call, ct => DecodeAsync(r, call, ct)));
        }

        if (_options.Role == WorkerRole.Prefill)
            router.Unary<PrefillRequest, PrefillResponse>(Service + "Prefill", PrefillRequest.Parser, PrefillOrCancelAsync);
        if (_options.Role == WorkerRole.Colocated)
            router.ServerStreaming<GenerateRequest>(Service + "Generate", GenerateRequest.Parser, (r, call) => DrainedAsync(call, ct => GenerateAsync(r, call, ct)));

        var tenants = new TenantRegistry([new TenantConfig(_options.Tenant, _options.Token)]);
        var dispatcher = new GrpcDispatcher(router, tenants, new MetricsRegistry(), _logs.CreateLogger("kvfabric.worker.rpc"), 64 << 20)
        {
            ServerName = $"worker {_options.Name}",
        };
        _dispatcher = dispatcher;
        _app = KestrelHost.Build(_options.Listen, _options.Port, HttpProtocols.Http2, null, _logs);
        _app.Run(async http =>
        {
            await dispatcher.HandleAsync(http).ConfigureAwait(false);
        });
        Routes = router;
        await _app.StartAsync(cancellationToken).ConfigureAwait(false);
        Endpoint = KestrelHost.BoundEndpoint(_app);
        _log.LogInformation("kvfabric {Role} worker {Name} serving gRPC on http://{Endpoint}; model {Model} ({Threads} threads, {Layout}); {Blocks} KV blocks; transfer agent {Agent}{Faults}",
            _options.Role.ToString().ToLowerInvariant(), _options.Name, Endpoint, _options.Model, _model.Threads, _model.Layout.Describe(), _options.KvBlocks,
            _agent.TcpEndpoint, _options.CorruptNthPayload > 0 ? $"; FAULT INJECTION: payload {_options.CorruptNthPayload} is corrupted" : string.Empty);
    }

    private WorkerStatus Status()
    {
        TransferStats t = _agent.Stats;
        return new WorkerStatus
        {
            Name = _options.Name, Role = _options.Role.ToString().ToLowerInvariant(), Model = _options.Model,
            Active = (uint)Math.Max(0, Volatile.Read(ref _active)), Completed = (ulong)Interlocked.Read(ref _completed), Failed = (ulong)Interlocked.Read(ref _failed),
            KvBlocksTotal = (uint)_pool.Capacity, KvBlocksFree = (uint)_pool.Available,
            HandoffSlotsTotal = (uint)(_handoff is null ? 0 : _options.HandoffSlots), HandoffSlotsFree = (uint)(_handoff?.FreeSlots ?? 0),
            MeanBatch = _scheduler?.MeanBatch ?? 0, DecodeSteps = (ulong)(_scheduler?.Steps ?? 0),
            HandoffRetries = (ulong)Interlocked.Read(ref _retries), Fallbacks = (ulong)Interlocked.Read(ref _fallbacks),
            TcpBytesSent = (ulong)t.TcpBytesSent, ShmBytesWritten = (ulong)t.ShmBytesWritten, UcxBytesSent = (ulong)t.UcxBytesSent,
            UnknownNotifications = (ulong)(_handoff?.UnknownNotifications ?? 0), UnclaimedReclaimed = (ulong)(_handoff?.UnclaimedReclaimed ?? 0),
        };
    }

    private ReserveHandoffResponse Reserve(ReserveHandoffRequest r)
    {
        if (Volatile.Read(ref _draining) != 0)
            throw ShuttingDown("Reserve");
        TimeSpan lease = r.LeaseMs == 0 ? _options.HandoffLease : TimeSpan.FromMilliseconds(r.LeaseMs);
        // Bounded: a reservation nobody fills holds its slots for the lease, and the Decode's wait for the KV (a timer:
        // at most ~49 days) could not even be armed for the longest lease_ms.
        if (lease > MaxHandoffLease)
            throw new RpcException(StatusCode.InvalidArgument, $"lease_ms is {r.LeaseMs}; at most {MaxHandoffLease.TotalMilliseconds:0} (1 hour), or 0 for the worker's default ({_options.HandoffLease.TotalMilliseconds:0})");
        if (r.PromptTokens == 0 || r.PromptTokens >= _model.Config.MaxPositions)
            throw new RpcException(StatusCode.InvalidArgument, $"prompt_tokens is {r.PromptTokens}; the model ({_options.Model}) takes 1 to {_model.Config.MaxPositions - 1}");
        HandoffTicket t;
        try
        {
            t = _decode!.Reserve(r.RequestId, (int)r.PromptTokens, lease);
        }
        catch (InvalidOperationException e)
        {
            throw new RpcException(e.Message.Contains("already", StringComparison.Ordinal) ? StatusCode.AlreadyExists : StatusCode.ResourceExhausted, e.Message);
        }

        var ticket = new TicketMessage
        {
            RequestId = t.RequestId, Nonce = t.Nonce, ReceiverAgent = ByteString.CopyFrom(t.ReceiverAgent.ToByteArray()),
            BlockBytes = (uint)t.BlockBytes, LeaseMs = (uint)t.Lease.TotalMilliseconds, AgentMetadata = ByteString.CopyFrom(_metadata),
        };
        ticket.Addresses.Add(t.Addresses);
        return new ReserveHandoffResponse { Ticket = ticket };
    }

    /// <summary>
    /// A Prefill that fails before its first WRITE tells the decode worker so (a cancellation notification through the
    /// transfer layer, awaited for at most 2 s): its slots come back at once, not when the lease ends, since nothing can
    /// land in them any more (also when it is refused because this worker is shutting down). After a WRITE was posted
    /// it may still land: the slots then wait out the lease as before.
    /// </summary>
    private async Task<PrefillResponse> PrefillOrCancelAsync(PrefillRequest r, ServerCall call)
    {
        var posted = new StrongBox<bool>();
        try
        {
            return await DrainedAsync(call, ct => PrefillAsync(r, call, posted, ct)).ConfigureAwait(false);
        }
        catch when (!posted.Value && r.Ticket is { ReceiverAgent.Length: 16 } t)
        {
            try
            {
                RemoteAgent receiver = await RemoteAsync(new Guid(t.ReceiverAgent.Span), t.AgentMetadata).ConfigureAwait(false);
                TransferResult sent = await _agent.SendNotificationAsync(receiver, HandoffReceiver.Cancellation(t.RequestId, t.Nonce), TimeSpan.FromSeconds(2)).ConfigureAwait(false);
                if (!sent.IsSuccess)
                    _log.LogDebug("the cancellation of request {Request}'s hand-off did not reach its decode worker ({Error}); its slots come back when the lease ends", t.RequestId, sent.Error);
            }
            catch (Exception e)
            {
                _log.LogDebug("the cancellation of request {Request}'s hand-off did not reach its decode worker ({Error}); its slots come back when the lease ends", t.RequestId, e.Message);
            }

            throw;
        }
    }

    private async Task<PrefillResponse> PrefillAsync(PrefillRequest r, ServerCall call, StrongBox<bool> posted, CancellationToken cancellationToken)
    {
        if (r.Ticket is null)
            throw new RpcException(StatusCode.InvalidArgument, "Prefill needs the decode worker's hand-off ticket (from its Reserve)");
        int[] prompt = Prompt(r.Prompt);
        if (r.Ticket.ReceiverAgent.Length != 16)
            throw new RpcException(StatusCode.InvalidArgument, $"the ticket's receiver_agent has {r.Ticket.ReceiverAgent.Length} bytes; an agent id has 16 (pass the ticket Reserve returned, unchanged)");
        // The ticket's lease runs from now, on this process's clock.
        var ticket = new HandoffTicket(r.Ticket.RequestId, r.Ticket.Nonce, new Guid(r.Ticket.ReceiverAgent.Span), [.. r.Ticket.Addresses],
            (int)r.Ticket.BlockBytes, TimeSpan.FromMilliseconds(r.Ticket.LeaseMs));
        int blockBytes = checked((int)_model.Layout.BlockBytes);
        int slots = HandoffLayout.Slots(prompt.Length, _model.Config.TokensPerBlock, _model.Config.Vocab, blockBytes);
        if (ticket.Addresses.Length != slots || ticket.BlockBytes != blockBytes)
            throw new RpcException(StatusCode.InvalidArgument, $"the ticket has {ticket.Addresses.Length} slots of {ticket.BlockBytes} bytes; this prompt of {prompt.Length} tokens needs {slots} of {blockBytes} (the same model on both workers? the ticket reserved for this prompt?)");

        Interlocked.Increment(ref _active);
        try
        {
            var response = new PrefillResponse { Worker = _options.Name };
            using KvCache cache = NewCache();
            var logits = new float[_model.Config.Vocab];
            PrefillOutcome outcome = await ComputeAsync(prompt, cache, logits, !r.NoReuse, response, cancellationToken, ticket).ConfigureAwait(false);

            // Hand-off: the WRITE reads the cache's blocks (full and tail) in place, then the logits; the notification
            // fires on the decode side only when every byte is there and its checksum verified.
            var clock = Stopwatch.StartNew();
            RemoteAgent receiver = null!;
            using HandoffSource source = NewHandoffSource(cache, logits);
            nint[] blocks = source.Addresses;
            TransferResult sent = default;
            int attempt = 0;
            while (attempt < _options.HandoffAttempts)
            {
                attempt++;
                // Resolved each attempt: a request whose hand-off failed for good unloads the agent (below), and one
                // still holding that view then loads it afresh instead of failing on the unloaded one.
                receiver = await RemoteAsync(ticket.ReceiverAgent, r.Ticket.AgentMetadata).ConfigureAwait(false);
                posted.Value = true; // from here a WRITE may be on its way into the slots
                try
                {
                    sent = await HandoffSender.SendAsync(_agent, receiver, ticket, blocks, _options.Checksum, _options.Backend, cancellationToken).ConfigureAwait(false);
                }
                catch (TransferException e)
                {
                    // Refused before a byte moved: that view of the agent was unloaded or replaced; the next attempt reloads it.
                    sent = new TransferResult(TransferStatus.Failed, e.Message);
                    ForgetRemote(ticket.ReceiverAgent, receiver);
                }

                if (sent.IsSuccess || sent.Status is TransferStatus.TimedOut or TransferStatus.Cancelled || attempt == _options.HandoffAttempts)
                    break;
                Interlocked.Increment(ref _retries); // counted only when another attempt follows
                _log.LogWarning("hand-off of request {Request} to {Receiver} failed (attempt {Attempt} of {Attempts}): {Error}; retrying",
                    ticket.RequestId, receiver.Name, attempt, _options.HandoffAttempts, sent.Error);
            }

            if (sent.Status == TransferStatus.Cancelled)
                throw new RpcException(StatusCode.Cancelled, $"the hand-off of request {ticket.RequestId} was cancelled: {sent}");
            if (!sent.IsSuccess)
            {
                ForgetRemote(ticket.ReceiverAgent, receiver); // the decode worker may have died or restarted: load it afresh next time
                throw new RpcException(sent.Status == TransferStatus.TimedOut ? StatusCode.DeadlineExceeded : StatusCode.Unavailable,
                    $"the KV of request {ticket.RequestId} could not be handed to decode worker {receiver.Name} after {attempt} attempt(s): {sent}");
            }

            response.HandoffMs = clock.Elapsed.TotalMilliseconds;
            response.HandoffBytes = (ulong)blocks.Length * (ulong)ticket.BlockBytes;
            response.HandoffAttempts = (uint)attempt;

            // Offload after the hand-off: the decode side is already generating; this only serves later requests.
            try
            {
                await OffloadAsync(cache, outcome, response, cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or RpcException { Status: StatusCode.Cancelled } && cancellationToken.IsCancellationRequested)
            {
                // Cut off (the drain period ended, or the caller left): the KV is with the decode worker, which streams the
                // tokens, so the Prefill did its job. An error here would make the driver give up (or redo) a request
                // that is being served; only later requests' reuse of these blocks is lost.
                Interlocked.Increment(ref _fallbacks);
                _log.LogWarning("the offload of request {Request}'s computed blocks was cut off ({Error}); its hand-off is done, later requests will compute them again",
                    ticket.RequestId, e.Message);
            }

            Interlocked.Increment(ref _completed);
            return response;
        }
        catch
        {
            Interlocked.Increment(ref _failed);
            throw;
        }
        finally
        {
            Interlocked.Decrement(ref _active);
        }
    }

    /// <summary>Prefill on this worker's compute (one at a time, a bounded queue in front), filling the response's prefill fields.</summary>
    /// <param name="handoff">The ticket the result goes to: a prefill whose lease ran out while it queued is not computed.</param>
    private async Task<PrefillOutcome> ComputeAsync(int[] prompt, KvCache cache, float[] logits, bool reuse, PrefillResponse response, CancellationToken cancellationToken,
        HandoffTicket? handoff = null)
    {
        if (Interlocked.Increment(ref _queued) > _options.MaxQueued)
        {
            Interlocked.Decrement(ref _queued);
            throw new RpcException(StatusCode.ResourceExhausted, $"worker {_options.Name} has {_options.MaxQueued} prefills waiting already; retry later or add prefill workers");
        }

        var clock = Stopwatch.StartNew();
        PrefillOutcome outcome;
        try
        {
            await _compute.WaitAsync(cancellationToken).ConfigureAwait(false);
        }
        finally
        {
            Interlocked.Decrement(ref _queued);
        }

        try
        {
            response.QueueMs = clock.Elapsed.TotalMilliseconds;
            // Its KV could no longer be sent (the WRITE must end inside the lease): computing it would only delay the
            // prefills queued behind it, whose leases then run out too.
            if (handoff is not null && handoff.Remaining(TimeSpan.FromMilliseconds(100)) <= TimeSpan.Zero)
                throw new RpcException(StatusCode.DeadlineExceeded,
                    $"the hand-off lease of request {handoff.RequestId} ({handoff.Lease.TotalMilliseconds:0} ms) ended while it waited {response.QueueMs:0} ms for worker {_options.Name}'s compute; nothing was computed: add prefill workers or reserve with a longer lease");
            outcome = await _prefill!.PrefillAsync(prompt, cache, logits, cancellationToken, reuse, offload: false).ConfigureAwait(false);
        }
        catch (InvalidOperationException e) when (IsPoolDry(e))
        {
            throw PoolDry(e);
        }
        finally
        {
            _compute.Release();
        }

        if (outcome.FabricError is not null)
        {
            Interlocked.Increment(ref _fallbacks);
            _log.LogWarning("prefill served without the fabric ({Error}); the prompt was computed", outcome.FabricError);
        }

        response.PromptTokens = (uint)outcome.PromptTokens;
        response.ReusedBlocks = (uint)outcome.ReusedBlocks;
        response.FetchedBlocks = (uint)outcome.FetchedBlocks;
        response.ComputedTokens = (uint)outcome.ComputedTokens;
        var byTier = new uint[4];
        foreach (Tier t in outcome.ReusedTiers)
            byTier[Math.Clamp((int)t, 0, 3)]++;
        response.ReusedByTier.Add(byTier);
        response.OnboardMs = outcome.Onboard.TotalMilliseconds;
        response.ComputeMs = outcome.Compute.TotalMilliseconds;
        return outcome;
    }

    /// <summary>Offloads the blocks the prefill computed (those after the reused prefix) to the sidecar.</summary>
    private async Task OffloadAsync(KvCache cache, PrefillOutcome outcome, PrefillResponse response, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        (int stored, string? error) = await _prefill!.OffloadAsync(cache, outcome, cancellationToken).ConfigureAwait(false);
        response.OffloadedBlocks = (uint)stored;
        response.OffloadMs = clock.Elapsed.TotalMilliseconds;
        if (error is not null)
        {
            Interlocked.Increment(ref _fallbacks);
            _log.LogWarning("the computed blocks could not be offloaded ({Error}); later requests will compute them again", error);
        }
    }

    private async Task DecodeAsync(DecodeRequest r, ServerCall call, CancellationToken cancellationToken)
    {
        int[] prompt;
        int maxNew;
        try
        {
            // All of the request checked before it waits for the KV: a bad one is told now, not after the hand-off
            // (up to its lease), and does not use up the KV its prefill sent.
            prompt = Prompt(r.Prompt);
            maxNew = MaxNew(r.MaxNewTokens, prompt.Length);
        }
        catch
        {
            ReleaseUnaccepted(r.RequestId);
            throw;
        }

        await TrackedAsync(async () =>
        {
            KvCache cache;
            try
            {
                cache = NewCache();
            }
            catch
            {
                ReleaseUnaccepted(r.RequestId);
                throw;
            }

            var logits = new float[_model.Config.Vocab];
            ChannelReader<GeneratedToken> tokens;
            try
            {
                await _decode!.AcceptAsync(r.RequestId, prompt, cache, logits, cancellationToken).ConfigureAwait(false);
                tokens = await _scheduler!.StartAsync(cache, logits, maxNew, Sampling(r.Temperature, r.Seed), cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                cache.Dispose(); // not taken by the scheduler: its blocks go back now
                throw e switch
                {
                    TimeoutException => new RpcException(StatusCode.DeadlineExceeded, e.Message),
                    HandoffTakenException => new RpcException(StatusCode.AlreadyExists, e.Message),
                    DecodeUnavailableException => new RpcException(StatusCode.Unavailable, e.Message),
                    InvalidOperationException when IsPoolDry(e) => PoolDry(e),
                    InvalidOperationException => new RpcException(StatusCode.FailedPrecondition, e.Message),
                    ArgumentException => new RpcException(StatusCode.InvalidArgument, e.Message),
                    _ => e,
                };
            }

            await StreamAsync(tokens, call, null).ConfigureAwait(false);
        }).ConfigureAwait(false);
    }

    /// <summary>
    /// A Decode that fails before AcceptAsync (which releases the reservation itself) gives its slots back here: once the
    /// prefill's WRITE has landed, nothing else would ever reclaim them (only unfilled reservations expire). A duplicated
    /// Decode of the same request leaves alone the reservation another Decode already waits for.
    /// </summary>
    private void ReleaseUnaccepted(ulong requestId) => _handoff!.ReleaseUntaken(requestId);

    private async Task GenerateAsync(GenerateRequest r, ServerCall call, CancellationToken cancellationToken)
    {
        int[] prompt = Prompt(r.Prompt);
        int maxNew = MaxNew(r.MaxNewTokens, prompt.Length); // before the prefill, not after computing it
        await TrackedAsync(async () =>
        {
            var response = new PrefillResponse { Worker = _options.Name };
            KvCache cache = NewCache();
            ChannelReader<GeneratedToken> tokens;
            try
            {
                var logits = new float[_model.Config.Vocab];
                PrefillOutcome outcome = await ComputeAsync(prompt, cache, logits, !r.NoReuse, response, cancellationToken).ConfigureAwait(false);
                await OffloadAsync(cache, outcome, response, cancellationToken).ConfigureAwait(false);
                tokens = await _scheduler!.StartAsync(cache, logits, maxNew, Sampling(r.Temperature, r.Seed), cancellationToken).ConfigureAwait(false);
            }
            catch (Exception e)
            {
                cache.Dispose();
                throw e switch
                {
                    ArgumentException => new RpcException(StatusCode.InvalidArgument, e.Message),
                    DecodeUnavailableException => new RpcException(StatusCode.Unavailable, e.Message),
                    _ => e,
                };
            }

            await StreamAsync(tokens, call, response).ConfigureAwait(false);
        }).ConfigureAwait(false);
    }

    /// <summary>
    /// Runs a call that holds work (Prefill, Decode, Generate) under the worker's graceful shutdown: refused once the worker
    /// drains, counted while it runs (the drain waits for these), and given a token that also fires when the drain period
    /// is over. A call ended by that is UNAVAILABLE (retry on another worker), never CANCELLED, which says the client
    /// cancelled.
    /// </summary>
    private async Task<T> DrainedAsync<T>(ServerCall call, Func<CancellationToken, Task<T>> handler)
    {
        Interlocked.Increment(ref _calls);
        try
        {
            if (Volatile.Read(ref _draining) != 0)
                throw ShuttingDown(call.Method);
            using var linked = CancellationTokenSource.CreateLinkedTokenSource(call.CancellationToken, _drainOver.Token);
            try
            {
                return await handler(linked.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or RpcException { Status: StatusCode.Cancelled }
                                      && _drainOver.IsCancellationRequested && !call.CancellationToken.IsCancellationRequested)
            {
                throw new RpcException(StatusCode.Unavailable,
                    $"worker {_options.Name} is shutting down and its drain period ({_options.DrainTimeout.TotalSeconds:0.#} s) ended before this call finished; retry on another worker");
            }
        }
        finally
        {
            Interlocked.Decrement(ref _calls);
        }
    }

    private Task DrainedAsync(ServerCall call, Func<CancellationToken, Task> handler) => DrainedAsync(call, async ct =>
    {
        await handler(ct).ConfigureAwait(false);
        return true;
    });

    private RpcException ShuttingDown(string method) =>
        new(StatusCode.Unavailable, $"worker {_options.Name} is shutting down and takes no new calls ({method.Replace(Service, string.Empty, StringComparison.Ordinal)}); retry on another worker");

    /// <summary>Runs one request's work, counted as active while it runs, then as completed or failed.</summary>
    private async Task TrackedAsync(Func<Task> work)
    {
        Interlocked.Increment(ref _active);
        try
        {
            await work().ConfigureAwait(false);
            Interlocked.Increment(ref _completed);
        }
        catch
        {
            Interlocked.Increment(ref _failed);
            throw;
        }
        finally
        {
            Interlocked.Decrement(ref _active);
        }
    }

    /// <summary>Streams tokens as they come: whatever is ready goes in one message.</summary>
    private static async Task StreamAsync(ChannelReader<GeneratedToken> tokens, ServerCall call, PrefillResponse? prefill)
    {
        try
        {
            while (await tokens.WaitToReadAsync(call.CancellationToken).ConfigureAwait(false))
            {
                var message = new GeneratedTokens { Prefill = prefill };
                prefill = null;
                bool first = true;
                while (tokens.TryRead(out GeneratedToken t))
                {
                    if (first)
                        message.FirstIndex = (uint)t.Index;
                    first = false;
                    message.Tokens.Add(t.Token);
                    message.UnixNanos.Add((t.TimestampTicks - DateTime.UnixEpoch.Ticks) * 100);
                }

                await call.WriteAsync(message).ConfigureAwait(false);
            }
        }
        catch (InvalidOperationException e)
        {
            // The sequence could not grow (KV pool dry), or the decode loop itself failed.
            throw new RpcException(e.Message.StartsWith("the sequence cannot grow", StringComparison.Ordinal) ? StatusCode.ResourceExhausted : StatusCode.Internal, e.Message);
        }
    }

    /// <summary>The KV pool ran dry while a request's cache grew: RESOURCE_EXHAUSTED (retry later), not an internal error.</summary>
    private HandoffSource NewHandoffSource(KvCache cache, float[] logits)
    {
        try
        {
            return new HandoffSource(cache, logits, _pool);
        }
        catch (InvalidOperationException e) when (IsPoolDry(e))
        {
            throw PoolDry(e);
        }
    }

    private static bool IsPoolDry(Exception e) => e.Message.Contains("pool exhausted", StringComparison.Ordinal); // HostBlockPool.Rent: not just any InvalidOperationException

    private RpcException PoolDry(Exception e) =>
        new(StatusCode.ResourceExhausted, $"worker {_options.Name}'s KV pool ({_pool.Capacity} blocks) ran dry: {e.Message}; retry when requests finish or start it with more --kv-blocks");

    private KvCache NewCache()
    {
        if (_pool.Available == 0)
            throw new RpcException(StatusCode.ResourceExhausted, $"worker {_options.Name}'s KV pool ({_pool.Capacity} blocks) is full; retry when requests finish or start it with more --kv-blocks");
        return _model.CreateCache(_pool);
    }

    private int[] Prompt(Google.Protobuf.Collections.RepeatedField<int> tokens)
    {
        if (tokens.Count == 0)
            throw new RpcException(StatusCode.InvalidArgument, "the prompt is empty");
        if (tokens.Count >= _model.Config.MaxPositions)
            throw new RpcException(StatusCode.InvalidArgument, $"the prompt has {tokens.Count} tokens; the model ({_options.Model}) takes fewer than {_model.Config.MaxPositions}");
        int[] prompt = [.. tokens];
        foreach (int t in prompt)
        {
            if ((uint)t >= (uint)_model.Config.Vocab)
                throw new RpcException(StatusCode.InvalidArgument, $"token {t} is outside the model's vocabulary (0 to {_model.Config.Vocab - 1})");
        }

        return prompt;
    }

    /// <summary>max_new_tokens, checked against the prompt before any work is done for the request.</summary>
    private int MaxNew(uint maxNewTokens, int promptTokens)
    {
        if (maxNewTokens == 0)
            throw new RpcException(StatusCode.InvalidArgument, "max_new_tokens must be at least 1");
        // Every generated token but the last is appended to the prompt's cache.
        int room = _model.Config.MaxPositions - promptTokens + 1;
        if (maxNewTokens > (uint)room)
            throw new RpcException(StatusCode.InvalidArgument, $"a prompt of {promptTokens} tokens leaves room for {room} new tokens in the model ({_options.Model}, {_model.Config.MaxPositions} positions); max_new_tokens is {maxNewTokens}");
        return (int)maxNewTokens;
    }

    private static Sampler Sampling(float temperature, ulong seed) => temperature > 0 ? Sampler.WithTemperature(temperature, seed) : Sampler.Greedy();

    /// <summary>The decode worker's agent, loaded once from the metadata its tickets carry.</summary>
    private async Task<RemoteAgent> RemoteAsync(Guid agent, ByteString metadata)
    {
        Lazy<Task<RemoteAgent>> lazy = _remotes.GetOrAdd(agent, _ => new Lazy<Task<RemoteAgent>>(() => _agent.LoadRemoteAsync(metadata.Memory)));
        RemoteAgent remote;
        try
        {
            remote = await lazy.Value.ConfigureAwait(false);
        }
        catch (Exception e)
        {
            _remotes.TryRemove(new KeyValuePair<Guid, Lazy<Task<RemoteAgent>>>(agent, lazy));
            throw new RpcException(StatusCode.Unavailable, $"the decode worker's transfer agent {agent} cannot be reached: {e.Message}");
        }

        if (remote.AgentId != agent)
        {
            // Cached under the ticket's agent id, this view would refuse every later hand-off to that agent.
            ForgetRemote(agent, remote);
            throw new RpcException(StatusCode.InvalidArgument, $"the ticket names transfer agent {agent} but its agent_metadata describes {remote.Name} ({remote.AgentId}); pass the ticket Reserve returned, unchanged");
        }

        return remote;
    }

    /// <summary>
    /// Drops a decode worker's agent after a failed hand-off, from this cache (only if it still holds that view) and from the
    /// transfer agent, whose view would otherwise keep the peer's connections and shared-memory mappings for as long as
    /// this process lives (a dead decode worker's agent id never comes back).
    /// </summary>
    private void ForgetRemote(Guid agent, RemoteAgent remote)
    {
        if (_remotes.TryGetValue(agent, out Lazy<Task<RemoteAgent>>? lazy) && lazy.IsValueCreated && lazy.Value.IsCompletedSuccessfully && lazy.Value.Result == remote)
            _remotes.TryRemove(new KeyValuePair<Guid, Lazy<Task<RemoteAgent>>>(agent, lazy));
        _ = UnloadAsync();

        async Task UnloadAsync()
        {
            try
            {
                await _agent.UnloadRemoteAsync(remote).ConfigureAwait(false); // waits for posts still on it, off the request's path
            }
            catch (Exception e)
            {
                _log.LogDebug("unloading agent {Agent} failed: {Error}", remote.Name, e.Message);
            }
        }
    }

    /// <summary>
    /// Graceful shutdown, first part: new calls are refused (UNAVAILABLE, health NOT_SERVING) while the listener stays
    /// open to say so; running calls get up to DrainTimeout to finish; those still running then end as UNAVAILABLE.
    /// Bounded: the drain period, then at most DrainEndGrace for the ended calls to send their status.
    /// </summary>
    private async Task DrainAsync()
    {
        if (Interlocked.Exchange(ref _draining, 1) != 0)
            return;
        _health?.SetAllNotServing();
        _dispatcher?.EndWatchStreams(); // health watchers see NOT_SERVING, then their stream ends: they do not hold the stop
        int running = Volatile.Read(ref _calls);
        if (running > 0)
            _log.LogInformation("worker {Name} is shutting down: {Calls} call(s) running get up to {Drain} s to finish; new calls are refused", _options.Name, running, _options.DrainTimeout.TotalSeconds);
        if (await CallsEndedAsync(_options.DrainTimeout).ConfigureAwait(false))
            return;
        _log.LogWarning("worker {Name}: {Calls} call(s) still running after the drain period ({Drain} s) end as UNAVAILABLE", _options.Name, Volatile.Read(ref _calls), _options.DrainTimeout.TotalSeconds);
        await _drainOver.CancelAsync().ConfigureAwait(false);
        if (!await CallsEndedAsync(DrainEndGrace).ConfigureAwait(false))
            _log.LogWarning("worker {Name}: {Calls} call(s) did not end within {Grace} s of being told to; the server stops under them", _options.Name, Volatile.Read(ref _calls), DrainEndGrace.TotalSeconds);
    }

    private static readonly TimeSpan DrainEndGrace = TimeSpan.FromSeconds(5);

    /// <summary>Whether every counted call ended within limit (polled: this runs once, at shutdown).</summary>
    private async Task<bool> CallsEndedAsync(TimeSpan limit)
    {
        long start = Stopwatch.GetTimestamp();
        while (Volatile.Read(ref _calls) > 0)
        {
            if (Stopwatch.GetElapsedTime(start) >= limit)
                return false;
            await Task.Delay(10).ConfigureAwait(false);
        }

        return true;
    }

    public async ValueTask DisposeAsync()
    {
        if (_app is not null)
        {
            await DrainAsync().ConfigureAwait(false);
            await _app.StopAsync().ConfigureAwait(false);
            await _app.DisposeAsync().ConfigureAwait(false);
        }

        if (_scheduler is not null)
            await _scheduler.DisposeAsync().ConfigureAwait(false);
        if (_handoff is not null)
            await _handoff.DisposeAsync().ConfigureAwait(false);
        await _agent.DisposeAsync().ConfigureAwait(false);
        _sidecar?.Dispose();
        _pool.Dispose();
        _compute.Dispose();
        _drainOver.Dispose();
    }
}
