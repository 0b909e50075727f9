using System.Diagnostics;
using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Prefill;

/// <summary>What one prefill did: blocks reused (by tier), tokens computed, blocks offloaded, and where the time went.</summary>
public sealed record PrefillOutcome(
    int PromptTokens, int ReusedBlocks, int FetchedBlocks, int ComputedTokens, int OffloadedBlocks, IReadOnlyList<Tier> ReusedTiers,
    TimeSpan Onboard, TimeSpan Compute, TimeSpan Offload);

/// <summary>
/// The prefill side of a request against the fabric: hash the prompt's full blocks (the hashing spec, under the tenant's
/// namespace and the model's layout), make the longest cached prefix local (Fetch: from this node's tiers, or from the
/// node the cluster index says holds it), onboard those blocks into the KV cache, compute only the rest, and offload
/// every new full block to the sidecar. At least the prompt's last token is always computed (its logits start decoding).
/// </summary>
public sealed class PrefillEngine(Transformer model, FabricClient sidecar, string tenant)
{
    public Transformer Model { get; } = model;

    public async Task<PrefillOutcome> PrefillAsync(ReadOnlyMemory<int> prompt, KvCache cache, Memory<float> logits, CancellationToken cancellationToken = default)
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
        int reuse = 0, fetched = 0;
        Tier[] tiers = [];
        // The last token is computed whatever is cached: its logits are what decoding starts from.
        int reusable = (prompt.Length - 1) / tpb;
        if (reusable > 0)
        {
            try
            {
                FetchResponse fetch = await sidecar.FetchAsync(packed.AsMemory(0, reusable * BlockHash.Size), options).ConfigureAwait(false);
                reuse = (int)Math.Min(fetch.LocalBlocks + fetch.FetchedBlocks, (uint)reusable);
                fetched = (int)fetch.FetchedBlocks;
            }
            catch (RpcException e) when (e.Status is StatusCode.Unavailable or StatusCode.ResourceExhausted or StatusCode.DeadlineExceeded)
            {
                // Reuse is an optimisation: when the fabric cannot give the prefix now, compute it (what is local may
                // still be onboarded next time).
                reuse = 0;
            }
        }

        if (reuse > 0)
        {
            byte[] bytes = new byte[reuse * blockBytes];
            try
            {
                tiers = await sidecar.GetAsync(packed.AsMemory(0, reuse * BlockHash.Size), bytes, blockBytes, options: options).ConfigureAwait(false);
            }
            catch (RpcException e) when (e.Status == StatusCode.NotFound)
            {
                reuse = 0; // evicted between Fetch and Get: compute everything
            }

            for (int i = 0; i < reuse; i++)
                cache.ImportBlock(i, bytes.AsSpan(i * blockBytes, blockBytes), prompt.Span.Slice(i * tpb, tpb));
        }

        TimeSpan onboard = clock.Elapsed;
        clock.Restart();
        Model.Prefill(prompt.Span, cache, reuse * tpb, logits.Span);
        TimeSpan compute = clock.Elapsed;
        clock.Restart();

        int offloaded = 0;
        if (full > reuse)
        {
            var blocks = new BlockToPut[full - reuse];
            byte[] bytes = new byte[(full - reuse) * blockBytes]; // one buffer per request, not one per block
            for (int i = reuse; i < full; i++)
            {
                Memory<byte> block = bytes.AsMemory((i - reuse) * blockBytes, blockBytes);
                cache.ExportBlock(i, block.Span);
                blocks[i - reuse] = new BlockToPut(packed.AsMemory(i * BlockHash.Size, BlockHash.Size),
                    i == 0 ? ReadOnlyMemory<byte>.Empty : packed.AsMemory((i - 1) * BlockHash.Size, BlockHash.Size), (uint)i, block);
            }

            PutResponse put = await sidecar.PutAsync(blocks, options).ConfigureAwait(false);
            offloaded = (int)put.Stored;
        }

        return new PrefillOutcome(prompt.Length, reuse, fetched, prompt.Length - reuse * tpb, offloaded, tiers, onboard, compute, clock.Elapsed);
    }
}
