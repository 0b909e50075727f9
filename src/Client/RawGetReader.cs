using System.Buffers.Binary;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;

namespace KvFabric.Client;

/// <summary>
/// Reads a Get response stream straight from the HTTP/2 body: gRPC message prefixes and GetResponse fields are parsed as
/// they arrive, and each data chunk is read from the body directly into its place in the destination (one copy, no
/// intermediate buffer). Field numbers are fabric.proto's: 1 hash, 2 block_length, 3 tier, 4 offset, 5 data, 6 in_slot.
/// </summary>
internal sealed class RawGetReader(Stream body, int maxMessageBytes, CancellationToken cancellationToken)
{
    private readonly byte[] _small = new byte[32];

    /// <summary>Reads every message; returns how many blocks started. Throws RpcException(Internal) on a malformed stream.</summary>
    public async ValueTask<int> ReadAllAsync(Memory<byte> destination, int blockBytes, int count, Tier[] tiers)
    {
        int block = -1;
        ulong next = 0; // where the block's next chunk goes: chunks arrive in order (fabric.proto)
        while (true)
        {
            int got = await body.ReadAtLeastAsync(_small.AsMemory(0, 5), 5, throwOnEndOfStream: false, cancellationToken).ConfigureAwait(false);
            if (got == 0)
                return block + 1;
            if (got < 5)
                throw Malformed($"the stream ended inside a message prefix ({got} of 5 bytes)");
            if (_small[0] != 0)
                throw Malformed("a message is compressed without grpc-encoding");
            uint length = BinaryPrimitives.ReadUInt32BigEndian(_small.AsSpan(1));
            if (length > (uint)maxMessageBytes)
                throw new RpcException(StatusCode.ResourceExhausted, $"received message of {length} bytes is larger than the limit of {maxMessageBytes} bytes");
            long remaining = length;
            ulong offset = 0, blockLength = 0, tier = 0;
            bool offsetSeen = false, dataSeen = false;
            ulong placedAt = 0;
            bool starts = false;
            while (remaining > 0)
            {
                (ulong tag, remaining) = await VarintAsync(remaining).ConfigureAwait(false);
                int field = (int)(tag >> 3), wire = (int)(tag & 7);
                if (wire == 0)
                {
                    (ulong v, remaining) = await VarintAsync(remaining).ConfigureAwait(false);
                    switch (field)
                    {
                        case 2: blockLength = v; break;
                        case 3: tier = v; break;
                        case 4: offset = v; offsetSeen = true; break;
                    }

                    continue;
                }

                if (wire is 1 or 5)
                {
                    // An unknown fixed-width field (a newer server's): skip it.
                    int width = wire == 1 ? 8 : 4;
                    if (remaining < width)
                        throw Malformed("a fixed-width field runs past the end of its message");
                    remaining -= width;
                    await SkipAsync(width).ConfigureAwait(false);
                    continue;
                }

                if (wire != 2)
                    throw Malformed($"field {field} has wire type {wire}");
                (ulong n, remaining) = await VarintAsync(remaining).ConfigureAwait(false);
                if (n > (ulong)remaining)
                    throw Malformed($"a field claims {n} bytes; {remaining} remain in the message");
                remaining -= (long)n;
                if (field == 1 && n > 0)
                {
                    starts = true;
                    await SkipAsync((long)n).ConfigureAwait(false);
                }
                else if (field == 5)
                {
                    if (starts)
                    {
                        StartBlock(ref block, blockLength, blockBytes, count, tiers, tier);
                        next = 0;
                    }

                    // The offset field, when present, comes first in canonical encoding; without it the chunk is the next one.
                    placedAt = offsetSeen ? offset : next;
                    if (block < 0 || placedAt > (ulong)blockBytes || n > (ulong)blockBytes - placedAt)
                        throw Malformed($"chunk at offset {placedAt} of {n} bytes does not fit block {block}");
                    await body.ReadExactlyAsync(destination.Slice(block * blockBytes + (int)placedAt, (int)n), cancellationToken).ConfigureAwait(false);
                    next = placedAt + n;
                    dataSeen = true;
                    starts = false;
                }
                else
                {
                    await SkipAsync((long)n).ConfigureAwait(false);
                }
            }

            if (starts)
            {
                StartBlock(ref block, blockLength, blockBytes, count, tiers, tier); // a block whose first message had no data
                next = 0;
            }

            // An offset written after the data must agree with where the chunk went (chunks come in order).
            if (dataSeen && offsetSeen && offset != placedAt)
                throw Malformed($"chunk of block {block} said offset {offset} after its data, which was the chunk at {placedAt}: chunks must arrive in order");
        }
    }

    private static void StartBlock(ref int block, ulong blockLength, int blockBytes, int count, Tier[] tiers, ulong tier)
    {
        block++;
        if (block >= count || blockLength != (ulong)blockBytes)
            throw Malformed($"the server sent block {block} of {blockLength} bytes; expected {count} blocks of {blockBytes}");
        tiers[block] = (Tier)tier;
    }

    private async ValueTask<(ulong Value, long Remaining)> VarintAsync(long remaining)
    {
        ulong value = 0;
        for (int shift = 0; shift < 64; shift += 7)
        {
            if (remaining-- <= 0)
                throw Malformed("a varint runs past the end of its message");
            await body.ReadExactlyAsync(_small.AsMemory(0, 1), cancellationToken).ConfigureAwait(false);
            byte b = _small[0];
            value |= (ulong)(b & 0x7F) << shift;
            if (b < 0x80)
                return (value, remaining);
        }

        throw Malformed("a varint is longer than 10 bytes");
    }

    private async ValueTask SkipAsync(long n)
    {
        while (n > 0)
        {
            int step = (int)Math.Min(n, _small.Length);
            await body.ReadExactlyAsync(_small.AsMemory(0, step), cancellationToken).ConfigureAwait(false);
            n -= step;
        }
    }

    private static RpcException Malformed(string what) => new(StatusCode.Internal, $"Get: malformed response stream: {what}");
}
