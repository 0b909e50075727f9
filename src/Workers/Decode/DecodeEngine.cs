using KvFabric.Memory;
using KvFabric.Workers.Handoff;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Decode;

/// <summary>
/// The decode side of a request: takes the prompt's full KV blocks from the hand-off (once their notification says every
/// byte is in place), recomputes the partial tail block (fewer than a block of tokens; the kernels are batch-invariant,
/// so its K/V and the last logits are bit-identical to the prefill side's), then generates.
/// </summary>
public sealed class DecodeEngine(Transformer model, HandoffReceiver handoff)
{
    public Transformer Model { get; } = model;

    /// <summary>Reserves the hand-off slots for a request of promptTokens (the ticket goes to the prefill side).</summary>
    public HandoffTicket Reserve(ulong requestId, int promptTokens, TimeSpan lease) =>
        handoff.Reserve(requestId, Math.Max(1, promptTokens / Model.Layout.TokensPerBlock), lease);

    /// <summary>Waits for the request's KV, imports it into cache and writes the last prompt token's logits.</summary>
    public async Task AcceptAsync(ulong requestId, ReadOnlyMemory<int> prompt, KvCache cache, Memory<float> logits, CancellationToken cancellationToken)
    {
        int tpb = Model.Layout.TokensPerBlock;
        int full = prompt.Length / tpb;
        try
        {
            BlockSlot[] slots = await handoff.WaitAsync(requestId, cancellationToken).ConfigureAwait(false);
            int blockBytes = checked((int)Model.Layout.BlockBytes);
            // A prompt shorter than a block still reserved one slot; it carries nothing.
            for (int i = 0; i < full; i++)
                cache.ImportBlock(i, slots[i].AsSpan()[..blockBytes], prompt.Span.Slice(i * tpb, tpb));
        }
        finally
        {
            handoff.Release(requestId);
        }

        // The tail (and, when the prompt ends on a block boundary, its last block) is recomputed for the logits.
        int start = Math.Min(full * tpb, prompt.Length - 1);
        if (start < cache.Length)
            cache.Truncate(start);
        Model.Prefill(prompt.Span, cache, start, logits.Span);
    }

    /// <summary>Generates from logits (the prompt's last) with the sampler: the first token, then one decode step each.</summary>
    public int[] Generate(KvCache cache, Span<float> logits, int maxNewTokens, Sampler sampler)
    {
        var output = new int[maxNewTokens];
        for (int i = 0; i < maxNewTokens; i++)
        {
            output[i] = sampler.Sample(logits);
            if (i + 1 < maxNewTokens)
                Model.DecodeStep(output[i], cache, logits);
        }

        return output;
    }
}
