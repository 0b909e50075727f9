using KvFabric.Memory;
using KvFabric.Workers.Handoff;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Decode;

/// <summary>
/// The decode side of a request: takes the prompt's KV from the hand-off once its notification says every byte is in
/// place (the full blocks, the partial tail block, and the last prompt token's logits, all computed by the prefill
/// side), imports it, and generates. No prompt token is computed here, so a joining request never holds the model
/// (and the decode batch) up.
/// </summary>
public sealed class DecodeEngine(Transformer model, HandoffReceiver handoff)
{
    public Transformer Model { get; } = model;

    /// <summary>Reserves the hand-off slots for a request of promptTokens (the ticket goes to the prefill side).</summary>
    public HandoffTicket Reserve(ulong requestId, int promptTokens, TimeSpan lease) =>
        handoff.Reserve(requestId, HandoffLayout.Slots(promptTokens, Model.Layout.TokensPerBlock, Model.Config.Vocab, checked((int)Model.Layout.BlockBytes)), lease);

    /// <summary>Waits for the request's KV, imports it into cache and writes the last prompt token's logits.</summary>
    public async Task AcceptAsync(ulong requestId, ReadOnlyMemory<int> prompt, KvCache cache, Memory<float> logits, CancellationToken cancellationToken)
    {
        int tpb = Model.Layout.TokensPerBlock;
        int full = prompt.Length / tpb, tail = prompt.Length % tpb;
        bool mine = true;
        try
        {
            BlockSlot[] slots;
            try
            {
                slots = await handoff.WaitAsync(requestId, cancellationToken).ConfigureAwait(false);
            }
            catch (HandoffTakenException)
            {
                mine = false; // another Decode of this request has the slots: not this call's to release
                throw;
            }

            int blockBytes = checked((int)Model.Layout.BlockBytes);
            if (slots.Length != HandoffLayout.Slots(prompt.Length, tpb, Model.Config.Vocab, blockBytes))
                throw new InvalidOperationException($"request {requestId} was reserved for another prompt length ({slots.Length} slots); reserve with this prompt's {prompt.Length} tokens");
            for (int i = 0; i < full; i++)
                cache.ImportBlock(i, slots[i].AsSpan()[..blockBytes], prompt.Span.Slice(i * tpb, tpb));
            if (tail > 0)
                cache.ImportTail(slots[full].AsSpan()[..blockBytes], prompt.Span[(full * tpb)..]);
            HandoffLayout.ReadLogits(slots.AsSpan(full + (tail > 0 ? 1 : 0)), blockBytes, logits.Span);
        }
        finally
        {
            if (mine)
                handoff.Release(requestId);
        }
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
