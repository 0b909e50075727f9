using System.Diagnostics;
using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Prefill;

/// <summary>What one prefill did: blocks reused (by tier), tokens computed, blocks offloaded, and where the time went.</summary>
/// <remarks>FabricError is set when the sidecar could not serve reuse or offload (down, overloaded): the prompt was then computed
/// in full, or its new blocks were not offloaded; the request itself still succeeded.</remarks>
public sealed record PrefillOutcome(
    int PromptTokens, int ReusedBlocks, int FetchedBlocks, int ComputedTokens, int OffloadedBlocks, IReadOnlyList<Tier> ReusedTiers,
    TimeSpan Onboard, TimeSpan Compute, TimeSpan Offload, string? FabricError = null)
{
    /// <summary>The prompt's full-block hashes, packed (16 bytes each): an offload after the prefill reuses them.</summary>
    public ReadOnlyMemory<byte> BlockHashes { get; init; }
}

/// <summary>
/// The prefill side of a request against the fabric: hash the prompt's full blocks (the hashing spec, under the tenant's
/// namespace and the model's layout), make the longest cached prefix local (Fetch: from this node's tiers, or from the
/// node the cluster index says holds it), onboard those blocks into the KV cache, compute only the rest, and offload
/// every new full block to the sidecar. At least the prompt's last token is always computed (its logits start decoding).
/// </summary>
public sealed class PrefillEngine(Transformer model, FabricClient sidecar, string tenant, SidecarBreaker? breaker = null)
{
    public Transformer Model { get; } = model;
    /// <summary>Stops calling the sidecar for a while after it was unavailable (see <see cref="SidecarBreaker"/>).</summary>
    public SidecarBreaker Breaker { get; } = breaker ?? new SidecarBreaker();

    /// <param name="reuse">false: compute the whole prompt (the no-reuse baseline); new blocks are still offloaded.</param>
    /// <param name="offload">false: leave the offload to the caller (<see cref="OffloadAsync"/>), e.g. after the hand-off, off the TTFT path.</param>
    public async Task<PrefillOutcome> PrefillAsync(ReadOnlyMemory<int> prompt, KvCache cache, Memory<float> logits, CancellationToken cancellationToken = default,
        bool reuse = true, bool offload = true)
    {
        if (prompt.IsEmpty)
            throw new ArgumentException("the prompt is empty", nameof(prompt));
        if (cache.Length != 0)
            throw new ArgumentException("prefill starts from an empty KV cache (Clear it first)", nameof(cache));
        int tpb = Model.Layout.TokensPerBlock, blockBytes = checked((int)Model.Layout.BlockBytes);
        int full = prompt.Length / tpb;
        var hashes = new BlockHash[full];
        Model.ComputeBlockHashes(tenant, prompt.Span, hashes);
        byte[] packed = new byte[full * BlockHash.Size];
        for (int i = 0; i < full; i++)
            hashes[i].WriteTo(packed.AsSpan(i * BlockHash.Size));
        var options = new CallOptions(Deadline: TimeSpan.FromSeconds(60), CancellationToken: cancellationToken);

        var clock = Stopwatch.StartNew();
        int reused = 0, fetched = 0;
        Tier[] tiers = [];
        string? fabricError = null;
        // The last token is computed whatever is cached: its logits are what decoding starts from.
        int reusable = reuse ? (prompt.Length - 1) / tpb : 0;
        if (reusable > 0 && !Breaker.Allow(out fabricError))
        {
            fabricError = "Fetch: " + fabricError;
        }
        else if (reusable > 0)
        {
            try
            {
                FetchResponse fetch = await sidecar.FetchAsync(packed.AsMemory(0, reusable * BlockHash.Size), options).ConfigureAwait(false);
                Breaker.Succeeded();
                reused = (int)Math.Min(fetch.LocalBlocks + fetch.FetchedBlocks, (uint)reusable);
                fetched = (int)fetch.FetchedBlocks;
            }
            catch (RpcException e) when (Degraded(e.Status))
            {
                // Reuse is an optimisation: when the fabric cannot give the prefix now, compute it (what is local may
                // still be onboarded next time).
                Breaker.Failed(e.Status, e.Message);
                reused = 0;
                fabricError = $"Fetch: {e.Status}: {e.Message}";
            }
        }

        if (reused > 0)
        {
            byte[] bytes = new byte[reused * blockBytes];
            try
            {
                tiers = await sidecar.GetAsync(packed.AsMemory(0, reused * BlockHash.Size), bytes, blockBytes, options: options).ConfigureAwait(false);
                for (int i = 0; i < reused; i++)
                    cache.ImportBlock(i, bytes.AsSpan(i * blockBytes, blockBytes), prompt.Span.Slice(i * tpb, tpb));
            }
            catch (RpcException e) when (e.Status == StatusCode.NotFound || Degraded(e.Status))
            {
                // Evicted between Fetch and Get, or the sidecar went away: compute everything.
                Breaker.Failed(e.Status, e.Message);
                reused = 0;
                fetched = 0;
                tiers = [];
                fabricError = e.Status == StatusCode.NotFound ? null : $"Get: {e.Status}: {e.Message}";
            }
        }

        TimeSpan onboard = clock.Elapsed;
        clock.Restart();
        Model.Prefill(prompt.Span, cache, reused * tpb, logits.Span);
        TimeSpan compute = clock.Elapsed;
        clock.Restart();

        int offloaded = 0;
        if (offload)
        {
            (offloaded, string? error) = await OffloadAsync(cache, packed, reused, options).ConfigureAwait(false);
            fabricError ??= error;
        }

        return new PrefillOutcome(prompt.Length, reused, fetched, prompt.Length - reused * tpb, offloaded, tiers, onboard, compute, clock.Elapsed, fabricError)
        {
            BlockHashes = packed,
        };
    }

    /// <summary>
    /// Offloads the cache's full blocks from block `from` on (those the prefill computed) to the sidecar; returns how many
    /// it stored, or the reason it could not (the request keeps its KV; only later reuse is lost).
    /// </summary>
    public async Task<(int Stored, string? Error)> OffloadAsync(KvCache cache, int from, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(cache);
        int full = cache.FullBlocks;
        var hashes = new BlockHash[full];
        cache.ComputeBlockHashes(tenant, hashes);
        byte[] packed = new byte[full * BlockHash.Size];
        for (int i = 0; i < full; i++)
            hashes[i].WriteTo(packed.AsSpan(i * BlockHash.Size));
        return await OffloadAsync(cache, packed, from, new CallOptions(Deadline: TimeSpan.FromSeconds(60), CancellationToken: cancellationToken)).ConfigureAwait(false);
    }

    /// <summary>
    /// Offloads what <see cref="PrefillAsync"/> computed into `cache` (called with offload: false), with the block hashes
    /// the prefill already computed; returns how many blocks were stored, or the reason they could not be.
    /// </summary>
    public Task<(int Stored, string? Error)> OffloadAsync(KvCache cache, PrefillOutcome outcome, CancellationToken cancellationToken = default)
    {
        ArgumentNullException.ThrowIfNull(cache);
        ArgumentNullException.ThrowIfNull(outcome);
        return OffloadAsync(cache, outcome.BlockHashes, outcome.ReusedBlocks, new CallOptions(Deadline: TimeSpan.FromSeconds(60), CancellationToken: cancellationToken));
    }

    private async Task<(int Stored, string? Error)> OffloadAsync(KvCache cache, ReadOnlyMemory<byte> packed, int from, CallOptions options)
    {
        int blockBytes = checked((int)Model.Layout.BlockBytes);
        int full = Math.Min(cache.FullBlocks, packed.Length / BlockHash.Size);
        if (full <= from)
            return (0, null);
        if (!Breaker.Allow(out string? skipped))
            return (0, "Put: " + skipped);
        var blocks = new BlockToPut[full - from];
        byte[] bytes = new byte[(full - from) * blockBytes]; // one buffer per request, not one per block
        for (int i = from; i < full; i++)
        {
            Memory<byte> block = bytes.AsMemory((i - from) * blockBytes, blockBytes);
            cache.ExportBlock(i, block.Span);
            blocks[i - from] = new BlockToPut(packed.Slice(i * BlockHash.Size, BlockHash.Size),
                i == 0 ? ReadOnlyMemory<byte>.Empty : packed.Slice((i - 1) * BlockHash.Size, BlockHash.Size), (uint)i, block);
        }

        // In Puts of at most PutBatchBlocks, parents first: the sidecar stages each Put whole before storing it and
        // bounds what it stages at once, so one long prompt must not ask for all of it (or be refused whole).
        int stored = 0;
        for (int at = 0; at < blocks.Length; at += PutBatchBlocks)
        {
            BlockToPut[] batch = blocks[at..Math.Min(blocks.Length, at + PutBatchBlocks)];
            for (int attempt = 1; ; attempt++)
            {
                try
                {
                    PutResponse put = await sidecar.PutAsync(batch, options).ConfigureAwait(false);
                    Breaker.Succeeded();
                    stored += (int)put.Stored;
                    break;
                }
                catch (RpcException e) when (e.Status == StatusCode.ResourceExhausted && attempt < 3)
                {
                    // Other Puts hold the staging area: they finish in milliseconds.
                    await Task.Delay(TimeSpan.FromMilliseconds(5 << attempt), options.CancellationToken).ConfigureAwait(false);
                }
                catch (RpcException e) when (Degraded(e.Status))
                {
                    Breaker.Failed(e.Status, e.Message);
                    return (stored, $"Put: {e.Status}: {e.Message}");
                }
                catch (RpcException e) when (e.Status == StatusCode.FailedPrecondition)
                {
                    // The reused prefix these blocks extend was evicted since the Fetch: the sidecar is healthy, only this
                    // offload is lost (the request has its KV; a later one computes and offloads these blocks again).
                    return (stored, $"Put: {e.Status}: {e.Message}");
                }
            }
        }

        return (stored, null);
    }

    /// <summary>Most blocks offloaded per Put (the sidecar's default staging area holds 64).</summary>
    public int PutBatchBlocks { get; init; } = 16;

    /// <summary>The sidecar is down, restarting, overloaded or too slow: serve the request without the fabric.</summary>
    private static bool Degraded(StatusCode status) =>
        status is StatusCode.Unavailable or StatusCode.ResourceExhausted or StatusCode.DeadlineExceeded or StatusCode.Internal or StatusCode.Unknown;
}
