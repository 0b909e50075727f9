using System.Diagnostics;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Workers.Serving;

namespace KvFabric.Workers.Driver;

/// <summary>
/// What happened to one request: its tokens; TtftMs, from its arrival to when the decode worker sampled its first token
/// (both stamped with the host's real-time clock: the driver and the workers share the machine); TtftDeliveredMs, until
/// the driver read that token; the gaps between its tokens (decode worker's clock); and its prefill.
/// </summary>
public sealed record RequestResult(
    int Id, int[] Tokens, double TtftMs, double[] ItlMs, double E2eMs, PrefillResponse? Prefill, string PrefillWorker, string DecodeWorker,
    int Attempts, string? Error, double TtftDeliveredMs = 0)
{
    public bool Ok => Error is null;
}

public sealed record DriverOptions
{
    /// <summary>Most requests in flight at once (arrivals beyond it wait: the driver is a bounded queue, not an open loop past it).</summary>
    public int MaxInFlight { get; init; } = 8;
    /// <summary>Arrival times are multiplied by this (0: all at once, as fast as MaxInFlight allows).</summary>
    public double TimeScale { get; init; } = 1.0;
    public bool NoReuse { get; init; }
    /// <summary>Prefill everything first, then start decoding all at once (decode with no concurrent prefill: the ITL reference).</summary>
    public bool PrefillFirst { get; init; }
    /// <summary>
    /// With <see cref="PrefillFirst"/>: per request id, how long after the last prefill its decode starts, instead of all
    /// at once. Given the times at which a measured run's first tokens came, the decode batch grows and shrinks as in
    /// that run, with no prefill beside it: the reference at equal batch sizes.
    /// </summary>
    public IReadOnlyDictionary<int, double>? DecodeStartMs { get; init; }
    public float Temperature { get; init; }
    public ulong Seed { get; init; } = 1;
    /// <summary>Progress lines (null: none).</summary>
    public TextWriter? Progress { get; init; }
    public string Label { get; init; } = "run";
    /// <summary>The whole request's, across its attempts.</summary>
    public TimeSpan RequestDeadline { get; init; } = TimeSpan.FromMinutes(5);
    /// <summary>
    /// Most attempts of a request: one whose worker failed (UNAVAILABLE: it died or is shutting down) before any token
    /// reached the driver is tried again on workers that have not failed it, within RequestDeadline.
    /// </summary>
    public int MaxAttempts { get; init; } = 3;
}

/// <summary>
/// Replays a workload against the workers: at each request's arrival (bounded by MaxInFlight), disaggregated as
/// Reserve on a decode worker, its Decode stream, and Prefill on the routed prefill worker; or colocated as Generate.
/// A request whose worker fails before any of its tokens arrived (the worker died, or answers UNAVAILABLE because it is
/// shutting down) is tried again on another worker (its prefix is then reused from the fabric), at most MaxAttempts
/// times within its deadline. One whose stream breaks after tokens arrived is not replayed: it fails, saying so.
/// </summary>
public static class RequestDriver
{
    private static long s_nextId = Environment.TickCount64 << 20;

    /// <summary>A request's token stream as collected: tokens, TTFT (made, delivered), inter-token gaps.</summary>
    private readonly record struct Collected(int[] Tokens, double Ttft, double Delivered, double[] Itl);

    public static async Task<RequestResult[]> RunDisaggregatedAsync(Router router, IReadOnlyList<WorkloadRequest> requests, DriverOptions options,
        CancellationToken cancellationToken = default)
    {
        if (options.PrefillFirst)
            return await RunPrefillFirstAsync(router, requests, options, cancellationToken).ConfigureAwait(false);
        return await ReplayAsync(requests, options, r => OneDisaggregatedAsync(router, r, options, cancellationToken), cancellationToken).ConfigureAwait(false);
    }

    public static Task<RequestResult[]> RunColocatedAsync(IReadOnlyList<WorkerClient> workers, IReadOnlyList<WorkloadRequest> requests, DriverOptions options,
        CancellationToken cancellationToken = default)
    {
        int next = 0;
        return ReplayAsync(requests, options, r => OneColocatedAsync(workers, (int)((uint)Interlocked.Increment(ref next) % (uint)workers.Count), r, options, cancellationToken),
            cancellationToken);
    }

    private static async Task<RequestResult[]> ReplayAsync(IReadOnlyList<WorkloadRequest> requests, DriverOptions options, Func<WorkloadRequest, Task<RequestResult>> run,
        CancellationToken cancellationToken)
    {
        var results = new RequestResult[requests.Count];
        using var slots = new SemaphoreSlim(options.MaxInFlight, options.MaxInFlight);
        var clock = Stopwatch.StartNew();
        var tasks = new List<Task>(requests.Count);
        int done = 0;
        using var progress = options.Progress is null ? null : new Timer(_ =>
            options.Progress.WriteLine($"[{options.Label}] {Volatile.Read(ref done)}/{requests.Count} requests done, {options.MaxInFlight - slots.CurrentCount} in flight, {clock.Elapsed.TotalSeconds:0.0} s"),
            null, TimeSpan.FromSeconds(2), TimeSpan.FromSeconds(2));
        try
        {
            for (int i = 0; i < requests.Count; i++)
            {
                WorkloadRequest r = requests[i];
                long due = (long)(r.ArrivalMs * options.TimeScale);
                long wait = due - clock.ElapsedMilliseconds;
                if (wait > 0)
                    await Task.Delay(TimeSpan.FromMilliseconds(wait), cancellationToken).ConfigureAwait(false);
                await slots.WaitAsync(cancellationToken).ConfigureAwait(false);
                int index = i;
                tasks.Add(Task.Run(async () =>
                {
                    try
                    {
                        results[index] = await run(r).ConfigureAwait(false);
                    }
                    finally
                    {
                        slots.Release();
                        Interlocked.Increment(ref done);
                    }
                }, CancellationToken.None));
            }
        }
        catch
        {
            // Cancelled between arrivals: the requests already started see the same cancellation; wait for them, so none
            // outlives this call (releasing the disposed semaphore, still calling the workers the caller is tearing down).
            await Task.WhenAll(tasks).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
            throw;
        }

        await Task.WhenAll(tasks).ConfigureAwait(false);
        return results;
    }

    private static async Task<RequestResult> OneDisaggregatedAsync(Router router, WorkloadRequest r, DriverOptions options, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        var failedDecode = new HashSet<WorkerClient>();
        var failedPrefill = new HashSet<WorkerClient>();
        for (int attempt = 1; ; attempt++)
        {
            using Router.DecodeLease decode = router.PickDecode(failedDecode);
            WorkerClient prefill = await router.PickPrefillAsync(r.Prompt, cancellationToken, failedPrefill).ConfigureAwait(false);
            try
            {
                var (c, pre) = await HandOffAndDecodeAsync(prefill, decode.Worker, r, options, clock, null, cancellationToken).ConfigureAwait(false);
                return new RequestResult(r.Id, c.Tokens, c.Ttft, c.Itl, clock.Elapsed.TotalMilliseconds, pre, prefill.Name, decode.Worker.Name, attempt, null, c.Delivered);
            }
            catch (WorkerFailedException e) when (!cancellationToken.IsCancellationRequested)
            {
                (e is DecodeFailedException ? failedDecode : failedPrefill).Add(e is DecodeFailedException ? decode.Worker : prefill);
                string? stop = NotRetried(attempt, options, clock)
                    ?? (!router.HasDecoderBesides(failedDecode) ? "no other decode worker to retry on"
                    : !router.HasPrefillBesides(failedPrefill) ? "no other prefill worker to retry on"
                    : null);
                if (stop is not null)
                    return new RequestResult(r.Id, [], 0, [], clock.Elapsed.TotalMilliseconds, null, prefill.Name, decode.Worker.Name, attempt, $"{e.Message} (not retried: {stop})");
            }
            catch (Exception e) when (!cancellationToken.IsCancellationRequested)
            {
                return new RequestResult(r.Id, [], 0, [], clock.Elapsed.TotalMilliseconds, null, prefill.Name, decode.Worker.Name, attempt, e.Message);
            }
        }
    }

    /// <summary>Why a failed attempt is the last one whatever workers remain (attempts or deadline used up); null: it may go again.</summary>
    private static string? NotRetried(int attempt, DriverOptions options, Stopwatch clock) =>
        attempt >= options.MaxAttempts ? $"{attempt} attempts made, the most allowed"
        : clock.Elapsed >= options.RequestDeadline ? $"its deadline ({options.RequestDeadline.TotalSeconds:0.#} s) passed"
        : null;

    /// <summary>What is left of the request's deadline (at least a millisecond: a call with none left fails at once as DEADLINE_EXCEEDED).</summary>
    private static TimeSpan Left(DriverOptions options, Stopwatch clock) =>
        TimeSpan.FromMilliseconds(Math.Max(1, (options.RequestDeadline - clock.Elapsed).TotalMilliseconds));

    /// <summary>Whether a worker answers Status within a short deadline.</summary>
    private static async Task<bool> AliveAsync(WorkerClient worker)
    {
        try
        {
            await worker.StatusAsync(new CallOptions(TimeSpan.FromSeconds(2))).ConfigureAwait(false);
            return true;
        }
        catch (RpcException)
        {
            return false;
        }
    }

    /// <summary>A worker failed the request before any of its tokens arrived: worth trying again on another worker.</summary>
    private abstract class WorkerFailedException(string message, Exception inner) : Exception(message, inner);

    /// <summary>The decode side failed (the worker died, its stream broke or it is shutting down) before any token.</summary>
    private sealed class DecodeFailedException(string message, Exception inner) : WorkerFailedException(message, inner);

    /// <summary>The prefill worker is unavailable (shutting down, unreachable) while the decode worker is fine.</summary>
    private sealed class PrefillFailedException(string message, Exception inner) : WorkerFailedException(message, inner);

    /// <summary>Tokens of the current attempt that reached the driver (read by the attempt's prefill failure path).</summary>
    private sealed class Received
    {
        public int Tokens;
    }

    /// <summary>
    /// One disaggregated request: Reserve, open the Decode stream, Prefill (which WRITEs the KV), read the tokens.
    /// beforeDecode, when set, is awaited after the prefill and before the first token is read (prefill-first runs).
    /// </summary>
    private static async Task<(Collected Stream, PrefillResponse Prefill)> HandOffAndDecodeAsync(WorkerClient prefill, WorkerClient decode,
        WorkloadRequest r, DriverOptions options, Stopwatch clock, Func<Task>? beforeDecode, CancellationToken cancellationToken)
    {
        ulong id = (ulong)Interlocked.Increment(ref s_nextId);
        var call = new CallOptions(Left(options, clock), cancellationToken);
        var received = new Received();
        ReserveHandoffResponse reserved;
        long reserving = Stopwatch.GetTimestamp(); // the decode worker's lease runs from about here
        try
        {
            reserved = await decode.ReserveAsync(id, r.Prompt.Length, call).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.Status is StatusCode.Unavailable or StatusCode.Internal)
        {
            throw new DecodeFailedException($"decode worker {decode.Name} could not reserve the hand-off: {e.Message}", e);
        }

        var decodeRequest = new DecodeRequest { RequestId = id, MaxNewTokens = (uint)r.MaxNewTokens, Temperature = options.Temperature, Seed = options.Seed + (ulong)r.Id };
        decodeRequest.Prompt.Add(r.Prompt);
        using var cancelDecode = CancellationTokenSource.CreateLinkedTokenSource(cancellationToken);
        if (beforeDecode is not null)
        {
            PrefillResponse early = await PrefillAsync(prefill, id, r, LeaseLeft(reserved.Ticket, Stopwatch.GetElapsedTime(reserving)), options, call).ConfigureAwait(false);
            await beforeDecode().ConfigureAwait(false);
            clock.Restart(); // TTFT of a prefill-first run is not meaningful; ITL is what it measures
            return (await ReadTokensAsync(decode, decodeRequest, options, cancelDecode.Token, clock, received).ConfigureAwait(false), early);
        }

        Task<Collected> tokens = ReadTokensAsync(decode, decodeRequest, options, cancelDecode.Token, clock, received);
        PrefillResponse pre;
        try
        {
            pre = await PrefillAsync(prefill, id, r, LeaseLeft(reserved.Ticket, Stopwatch.GetElapsedTime(reserving)), options, call).ConfigureAwait(false);
        }
        catch (Exception) when (tokens is { IsFaulted: true, Exception.InnerException: DecodeFailedException decodeFailed })
        {
            // The prefill failed because its decode worker did (its hand-off could not be delivered to a dead worker whose
            // stream had already broken): a decode failure, worth retrying on another decode worker.
            throw decodeFailed;
        }
        catch (Exception e)
        {
            await cancelDecode.CancelAsync().ConfigureAwait(false); // the decode side gives up its reservation
            try
            {
                await tokens.ConfigureAwait(false);
            }
            catch (Exception)
            {
                // the prefill's failure is the one to report
            }

            // The prefill may notice first that the decode worker is gone (its hand-off found nobody): a decode failure too.
            // Otherwise the prefill worker is unavailable (shutting down, gone): worth another prefill worker, unless
            // tokens already came (then the KV was handed off and the failure came after; nothing is replayed).
            if (e is RpcException { Status: StatusCode.Unavailable } && !cancellationToken.IsCancellationRequested && Volatile.Read(ref received.Tokens) == 0)
            {
                if (!await AliveAsync(decode).ConfigureAwait(false))
                    throw new DecodeFailedException($"decode worker {decode.Name} is unreachable: {e.Message}", e);
                throw new PrefillFailedException($"prefill worker {prefill.Name} failed: {e.Message}", e);
            }

            throw;
        }

        return (await tokens.ConfigureAwait(false), pre);
    }

    /// <summary>
    /// The ticket as the prefill worker must see it: its lease less what already passed since the Reserve. The prefill
    /// side counts the lease from when the ticket reaches it, the decode side from the Reserve; a ticket passed on with
    /// its whole lease let a WRITE that started late run past the decode side's reservation (only its 2 s grace in
    /// between), into slots it may have given to another request.
    /// </summary>
    internal static HandoffReservation LeaseLeft(HandoffReservation ticket, TimeSpan sinceReserve)
    {
        var left = ticket.Clone();
        left.LeaseMs = (uint)Math.Clamp(ticket.LeaseMs - Math.Ceiling(sinceReserve.TotalMilliseconds), 1, ticket.LeaseMs == 0 ? 1 : ticket.LeaseMs);
        return left;
    }

    private static async Task<PrefillResponse> PrefillAsync(WorkerClient prefill, ulong id, WorkloadRequest r, HandoffReservation ticket, DriverOptions options, CallOptions call)
    {
        var request = new PrefillRequest { RequestId = id, Ticket = ticket, NoReuse = options.NoReuse };
        request.Prompt.Add(r.Prompt);
        return await prefill.PrefillAsync(request, call).ConfigureAwait(false);
    }

    private static async Task<Collected> ReadTokensAsync(WorkerClient decode, DecodeRequest request, DriverOptions options, CancellationToken cancellationToken,
        Stopwatch clock, Received received)
    {
        try
        {
            await using var stream = decode.Decode(request, new CallOptions(Left(options, clock), cancellationToken));
            return await CollectAsync(stream.ReadAsync, (int)request.MaxNewTokens, clock, null, received).ConfigureAwait(false);
        }
        catch (RpcException e) when (e.Status is StatusCode.Unavailable or StatusCode.Internal or StatusCode.Unknown && !cancellationToken.IsCancellationRequested)
        {
            throw Broken($"decode worker {decode.Name}", e, received, (int)request.MaxNewTokens);
        }
    }

    /// <summary>
    /// A worker's stream failed: before any token, a failure worth another worker; after some, the request fails with
    /// what happened. A replay elsewhere would start from the first token again, under tokens the caller may have acted on.
    /// </summary>
    private static Exception Broken(string worker, RpcException e, Received received, int maxNew)
    {
        int got = Volatile.Read(ref received.Tokens);
        return got == 0
            ? new DecodeFailedException($"{worker} failed before its first token: {e.Message}", e)
            : new InvalidOperationException($"{worker} failed after {got} of {maxNew} tokens had been streamed ({e.Message}); the request is not replayed on another worker, which would stream it again from its first token: send it again if a restart is acceptable", e);
    }

    private static async Task<Collected> CollectAsync(Func<ValueTask<GeneratedTokens?>> read, int maxNew, Stopwatch clock, Action<PrefillResponse>? prefill,
        Received received)
    {
        var tokens = new List<int>(maxNew);
        var stamps = new List<long>(maxNew);
        double delivered = 0;
        while (await read().ConfigureAwait(false) is { } m)
        {
            if (tokens.Count == 0)
                delivered = clock.Elapsed.TotalMilliseconds;
            if (m.Prefill is not null)
                prefill?.Invoke(m.Prefill);
            if (m.FirstIndex != tokens.Count)
                throw new RpcException(StatusCode.Internal, $"token {m.FirstIndex} arrived when {tokens.Count} was expected");
            tokens.AddRange(m.Tokens);
            stamps.AddRange(m.UnixNanos);
            Volatile.Write(ref received.Tokens, tokens.Count);
        }

        if (tokens.Count != maxNew)
            throw new RpcException(StatusCode.Internal, $"the stream ended after {tokens.Count} of {maxNew} tokens");
        var itl = new double[Math.Max(0, stamps.Count - 1)];
        for (int i = 1; i < stamps.Count; i++)
            itl[i - 1] = (stamps[i] - stamps[i - 1]) / 1e6;
        // The request's arrival on the real-time clock the worker stamped its tokens with (same host).
        long arrivalNs = ((DateTime.UtcNow.Ticks - DateTime.UnixEpoch.Ticks) * 100) - (long)(clock.Elapsed.TotalMilliseconds * 1e6);
        double made = stamps.Count == 0 ? delivered : Math.Clamp((stamps[0] - arrivalNs) / 1e6, 0, delivered);
        return new Collected([.. tokens], made, delivered, itl);
    }

    private static async Task<RequestResult> OneColocatedAsync(IReadOnlyList<WorkerClient> workers, int first, WorkloadRequest r, DriverOptions options,
        CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        var failed = new HashSet<WorkerClient>();
        for (int attempt = 1; ; attempt++)
        {
            // The worker round robin chose, else the next one that has not failed this request.
            WorkerClient worker = Enumerable.Range(0, workers.Count).Select(i => workers[(first + i) % workers.Count]).First(w => !failed.Contains(w));
            var request = new GenerateRequest { RequestId = (ulong)Interlocked.Increment(ref s_nextId), MaxNewTokens = (uint)r.MaxNewTokens, NoReuse = options.NoReuse,
                Temperature = options.Temperature, Seed = options.Seed + (ulong)r.Id };
            request.Prompt.Add(r.Prompt);
            var received = new Received();
            try
            {
                try
                {
                    await using var stream = worker.Generate(request, new CallOptions(Left(options, clock), cancellationToken));
                    PrefillResponse? pre = null;
                    Collected c = await CollectAsync(stream.ReadAsync, r.MaxNewTokens, clock, p => pre = p, received).ConfigureAwait(false);
                    return new RequestResult(r.Id, c.Tokens, c.Ttft, c.Itl, clock.Elapsed.TotalMilliseconds, pre, worker.Name, worker.Name, attempt, null, c.Delivered);
                }
                catch (RpcException e) when (e.Status is StatusCode.Unavailable && !cancellationToken.IsCancellationRequested)
                {
                    throw Broken($"worker {worker.Name}", e, received, r.MaxNewTokens);
                }
            }
            catch (DecodeFailedException e) when (!cancellationToken.IsCancellationRequested)
            {
                failed.Add(worker);
                string? stop = NotRetried(attempt, options, clock) ?? (failed.Count == workers.Count ? "no other worker to retry on" : null);
                if (stop is not null)
                    return new RequestResult(r.Id, [], 0, [], clock.Elapsed.TotalMilliseconds, null, worker.Name, worker.Name, attempt, $"{e.Message} (not retried: {stop})");
            }
            catch (Exception e) when (!cancellationToken.IsCancellationRequested)
            {
                return new RequestResult(r.Id, [], 0, [], clock.Elapsed.TotalMilliseconds, null, worker.Name, worker.Name, attempt, e.Message);
            }
        }
    }

    /// <summary>
    /// The decode-only reference: every request is prefilled and handed off first (all KV waits in the decode workers'
    /// slots), then all decode streams start together (or each at its DecodeStartMs), so decoding runs with no prefill
    /// beside it.
    /// </summary>
    private static async Task<RequestResult[]> RunPrefillFirstAsync(Router router, IReadOnlyList<WorkloadRequest> requests, DriverOptions options, CancellationToken cancellationToken)
    {
        var gate = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var sinceGate = new Stopwatch();
        int prefilled = 0;
        void Prefilled()
        {
            if (Interlocked.Increment(ref prefilled) == requests.Count)
            {
                sinceGate.Start();
                gate.TrySetResult();
            }
        }
        var tasks = requests.Select(async r =>
        {
            var clock = Stopwatch.StartNew();
            bool counted = false; // a request counts once towards the gate, whether it reached its decode or failed before
            using Router.DecodeLease decode = router.PickDecode();
            WorkerClient prefill = await router.PickPrefillAsync(r.Prompt, cancellationToken).ConfigureAwait(false);
            try
            {
                var (c, pre) = await HandOffAndDecodeAsync(prefill, decode.Worker, r, options, clock, async () =>
                {
                    counted = true;
                    Prefilled();
                    await gate.Task.WaitAsync(options.RequestDeadline, cancellationToken).ConfigureAwait(false);
                    if (options.DecodeStartMs?.GetValueOrDefault(r.Id) is > 0 and var start && start - sinceGate.Elapsed.TotalMilliseconds is > 0 and var wait)
                        await Task.Delay(TimeSpan.FromMilliseconds(wait), cancellationToken).ConfigureAwait(false);
                }, cancellationToken).ConfigureAwait(false);
                return new RequestResult(r.Id, c.Tokens, c.Ttft, c.Itl, clock.Elapsed.TotalMilliseconds, pre, prefill.Name, decode.Worker.Name, 1, null, c.Delivered);
            }
            catch (Exception e) when (!cancellationToken.IsCancellationRequested)
            {
                if (!counted)
                    Prefilled();
                return new RequestResult(r.Id, [], 0, [], clock.Elapsed.TotalMilliseconds, null, prefill.Name, decode.Worker.Name, 1, e.Message);
            }
        }).ToList();
        return await Task.WhenAll(tasks).ConfigureAwait(false);
    }
}
