using System.Buffers.Binary;
using System.Diagnostics;
using KvFabric.Memory;
using KvFabric.Transfer;
using KvFabric.Workers.Model;

namespace KvFabric.Workers.Handoff;

/// <summary>
/// Where the prefill side writes one request's blocks: slot addresses in the decode side's registered pool. Nonce names
/// this reservation (a retried request gets a new one, so a late notification of an old attempt never completes it).
/// Lease is relative: the sender counts it from when it got the ticket (ReceivedTicks, its own clock), never from the
/// receiver's clock, so clock skew between hosts cannot stretch a WRITE past the reservation.
/// </summary>
public sealed record HandoffTicket(ulong RequestId, ulong Nonce, Guid ReceiverAgent, ulong[] Addresses, int BlockBytes, TimeSpan Lease)
{
    public long ReceivedTicks { get; init; } = Environment.TickCount64;

    /// <summary>Time left for the WRITE, on the holder's clock, less a safety margin.</summary>
    public TimeSpan Remaining(TimeSpan margin) => Lease - TimeSpan.FromMilliseconds(Environment.TickCount64 - ReceivedTicks) - margin;
}

/// <summary>
/// The decode side of the KV hand-off: block slots in a registered (shared) pool are reserved per request, the prefill
/// side WRITEs the request's blocks into them with a notification, and the transfer layer delivers that notification
/// only once every byte is in place and checksum-verified; then the request's slots are handed to the decoder.
/// Bounded: a fixed pool; a reservation nobody completes is reclaimed after its lease plus a grace period (so a late
/// WRITE, whose deadline the lease bounds, can never land in slots reused by another request).
/// </summary>
public sealed class HandoffReceiver : IAsyncDisposable
{
    public const int NotificationBytes = 24;
    private static readonly byte[] Magic = "KVHO"u8.ToArray();
    // From the prefill side: "I never started a WRITE for this reservation (nonce) and never will" (its Prefill failed first).
    private static readonly byte[] CancelMagic = "KVCN"u8.ToArray();
    private static readonly TimeSpan Grace = TimeSpan.FromSeconds(2);
    private readonly TransferAgent _agent;
    private readonly HostBlockPool _pool;
    private readonly Dictionary<ulong, Pending> _pending = new();
    private readonly Lock _lock = new();
    private readonly CancellationTokenSource _stop = new();
    private readonly Task _dispatch;
    private readonly IReadOnlyList<RegisteredRegion> _regions;
    private long _unknown, _unclaimed;

    // Leases run on the monotonic clock (Stopwatch): a wall clock that is stepped must not shorten or stretch them.
    private static TimeSpan Now => Stopwatch.GetElapsedTime(0);

    private sealed class Pending(BlockSlot[] slots, TimeSpan expires, TimeSpan lease, ulong nonce)
    {
        public readonly BlockSlot[] Slots = slots;
        public readonly ulong Nonce = nonce;
        public readonly TimeSpan Expires = expires;   // on Now's clock
        public readonly TimeSpan Lease = lease;
        public readonly TaskCompletionSource<BlockSlot[]> Done = new(TaskCreationOptions.RunContinuationsAsynchronously);
        public TimeSpan FilledAt;       // when the notification came, on Now's clock (under the receiver's lock)
        public bool Claimed;            // WaitAsync handed the slots to the decoder (under the receiver's lock)
        public bool Taken;              // a WaitAsync waits for (or has) the slots: a second one is refused (under the receiver's lock)
    }

    /// <param name="agent">The decode process's transfer agent; this receiver reads all of its notifications.</param>
    /// <param name="ucxMemory">Let UCX allocate the slots (the agent runs UCX): its shared-memory transports then put
    /// into them with one copy. Otherwise they are /dev/shm segments, which the shared-memory backend maps.</param>
    public HandoffReceiver(TransferAgent agent, int blockBytes, int slots, bool ucxMemory = false)
    {
        _agent = agent;
        _pool = new HostBlockPool(ucxMemory
            ? new HostBlockPoolOptions { SlotBytes = blockBytes, SlotCount = slots, Tag = "handoff", Allocator = agent.AllocateUcx }
            : new HostBlockPoolOptions { SlotBytes = blockBytes, SlotCount = slots, Shared = true, Tag = "handoff" });
        _regions = agent.Register(_pool);
        _dispatch = Task.Run(DispatchAsync);
    }

    public int BlockBytes => _pool.SlotBytes;
    /// <summary>Slots free now, with what is due for reclaiming reclaimed first (else an idle worker reported slots taken that no request holds).</summary>
    public int FreeSlots
    {
        get
        {
            lock (_lock)
            {
                Reclaim();
                return _pool.Available;
            }
        }
    }

    /// <summary>Notifications that named no pending request (late, duplicated or foreign): counted and dropped.</summary>
    public long UnknownNotifications => Interlocked.Read(ref _unknown);

    /// <summary>Reserves slots for a request's blocks. The sender must finish its WRITE within the ticket's lease.</summary>
    public HandoffTicket Reserve(ulong requestId, int blocks, TimeSpan lease)
    {
        if (blocks < 1)
            throw new ArgumentOutOfRangeException(nameof(blocks), blocks, "a hand-off moves at least one block");
        lock (_lock)
        {
            Reclaim();
            if (_pending.ContainsKey(requestId))
                throw new InvalidOperationException($"request {requestId} already has a hand-off reservation");
            if (_pool.Available < blocks)
                throw new InvalidOperationException($"only {_pool.Available} of {_pool.Capacity} hand-off slots are free, {blocks} asked for; retry when requests finish or give the decode worker more slots");
            var slots = new BlockSlot[blocks];
            for (int i = 0; i < blocks; i++)
                slots[i] = _pool.Rent();
            var pending = new Pending(slots, Now + lease, lease, (ulong)Random.Shared.NextInt64(1, long.MaxValue));
            _pending[requestId] = pending;
            return new HandoffTicket(requestId, pending.Nonce, _agent.AgentId, slots.Select(s => (ulong)s.Address).ToArray(), _pool.SlotBytes, lease);
        }
    }

    /// <summary>The request's slots, once its notification arrived (every byte in place); the caller returns them with <see cref="Release"/>.</summary>
    public async Task<BlockSlot[]> WaitAsync(ulong requestId, CancellationToken cancellationToken)
    {
        Pending pending;
        lock (_lock)
        {
            if (!_pending.TryGetValue(requestId, out pending!))
                throw new InvalidOperationException($"request {requestId} has no hand-off reservation (never reserved, or it expired)");
            // One decoder per reservation: a second (a duplicated or retried Decode) would read slots the first releases.
            if (pending.Taken)
                throw new HandoffTakenException($"request {requestId}'s KV is already taken by another Decode of it; that call streams its tokens (a retry needs a new request id and reservation)");
            pending.Taken = true;
        }

        TimeSpan left = pending.Expires - Now + Grace;
        BlockSlot[] slots;
        try
        {
            slots = await pending.Done.Task.WaitAsync(left > TimeSpan.Zero ? left : TimeSpan.Zero, cancellationToken).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            // The lease and its grace are over: no WRITE can still be on its way (the sender's deadline ends inside the
            // lease), so the slots come back now rather than at the next reservation.
            lock (_lock)
            {
                if (_pending.TryGetValue(requestId, out Pending? current) && current == pending && !pending.Done.Task.IsCompleted)
                {
                    _pending.Remove(requestId);
                    pending.Done.TrySetCanceled();
                    foreach (BlockSlot s in pending.Slots)
                        _pool.Return(s);
                }
            }

            throw new TimeoutException($"the KV of request {requestId} did not arrive within its hand-off lease ({pending.Lease.TotalSeconds:0.#} s); the prefill worker failed or is too slow");
        }

        lock (_lock)
        {
            if (!_pending.TryGetValue(requestId, out Pending? current) || current != pending)
                throw new InvalidOperationException($"the KV of request {requestId} arrived but nobody claimed it within its lease ({pending.Lease.TotalSeconds:0.#} s) after; its slots were reclaimed: reserve and prefill again");
            pending.Claimed = true;
        }

        return slots;
    }

    /// <summary>Filled reservations nobody claimed within their lease after the KV arrived (a driver that died between Prefill and Decode), reclaimed.</summary>
    public long UnclaimedReclaimed => Interlocked.Read(ref _unclaimed);

    /// <summary>Returns a request's slots (after decoding, or to give up on it).</summary>
    public void Release(ulong requestId)
    {
        lock (_lock)
        {
            if (!_pending.Remove(requestId, out Pending? pending))
                return;
            if (!pending.Done.Task.IsCompleted && Now < pending.Expires + Grace)
            {
                // A WRITE may still be on its way: keep the slots until the lease (which bounds its deadline) has passed.
                _late.Add(pending);
                pending.Done.TrySetCanceled();
                return;
            }

            pending.Done.TrySetCanceled();
            foreach (BlockSlot s in pending.Slots)
                _pool.Return(s);
        }
    }

    /// <summary>
    /// Gives back a reservation whose ticket never reached anyone (the Reserve's answer could not be delivered: no status
    /// ever completed that call, so no client uses its ticket): no WRITE can be on its way, so its slots come back at once
    /// instead of after the lease. The nonce names that reservation: a later one under the same request id is left alone.
    /// </summary>
    public void ReleaseUndelivered(ulong requestId, ulong nonce)
    {
        lock (_lock)
        {
            if (!_pending.TryGetValue(requestId, out Pending? pending) || pending.Nonce != nonce)
                return;
            if (pending.Done.Task.IsCompleted)
            {
                // KV arrived after all (someone had the ticket): an ordinary release.
                Release(requestId);
                return;
            }

            _pending.Remove(requestId);
            pending.Done.TrySetCanceled();
            foreach (BlockSlot s in pending.Slots)
                _pool.Return(s);
        }
    }

    /// <summary>
    /// Releases a reservation that no decoder has taken yet (a Decode refused before it waited for the KV); one that
    /// another Decode of the same request waits for or decodes is left to that call.
    /// </summary>
    public void ReleaseUntaken(ulong requestId)
    {
        lock (_lock)
        {
            if (_pending.TryGetValue(requestId, out Pending? pending) && !pending.Taken)
                Release(requestId);
        }
    }

    private readonly List<Pending> _late = [];

    private void Reclaim()
    {
        TimeSpan now = Now;
        for (int i = _late.Count - 1; i >= 0; i--)
        {
            if (now >= _late[i].Expires + Grace)
            {
                foreach (BlockSlot s in _late[i].Slots)
                    _pool.Return(s);
                _late.RemoveAt(i);
            }
        }

        foreach (var (id, p) in _pending.Where(kv => now >= kv.Value.Expires + Grace && !kv.Value.Done.Task.IsCompleted).ToList())
        {
            _pending.Remove(id);
            p.Done.TrySetException(new TimeoutException($"the KV of request {id} did not arrive before its hand-off lease ended"));
            foreach (BlockSlot s in p.Slots)
                _pool.Return(s);
        }

        // KV that arrived but that no Decode came for within a lease after: whoever was to claim it is gone. (The WRITE is
        // complete, so nothing can still land in these slots.)
        foreach (var (id, p) in _pending.Where(kv => kv.Value.Done.Task.IsCompletedSuccessfully && !kv.Value.Claimed && now >= kv.Value.FilledAt + kv.Value.Lease + Grace).ToList())
        {
            _pending.Remove(id);
            Interlocked.Increment(ref _unclaimed);
            foreach (BlockSlot s in p.Slots)
                _pool.Return(s);
        }
    }

    /// <summary>
    /// The prefill side's cancellation of a reservation it never started a WRITE into (its Prefill failed first): nothing
    /// can land in its slots any more, so the receiver gives them back at once instead of after the lease. Only the one
    /// Prefill that holds a ticket may send it.
    /// </summary>
    public static byte[] Cancellation(ulong requestId, ulong nonce)
    {
        byte[] message = Notification(requestId, nonce, 0);
        CancelMagic.CopyTo(message, 0);
        return message;
    }

    /// <summary>Cancels the reservation (requestId, nonce) whose KV never came, also one a Decode gave up on (waiting out its lease).</summary>
    private bool Cancel(ulong requestId, ulong nonce)
    {
        lock (_lock)
        {
            if (_pending.TryGetValue(requestId, out Pending? p) && p.Nonce == nonce && !p.Done.Task.IsCompleted)
            {
                _pending.Remove(requestId);
                p.Done.TrySetException(new InvalidOperationException(
                    $"the prefill worker cancelled the hand-off of request {requestId}: its Prefill failed before sending the KV (see its error); reserve and prefill again"));
                foreach (BlockSlot s in p.Slots)
                    _pool.Return(s);
                return true;
            }

            int late = _late.FindIndex(l => l.Nonce == nonce);
            if (late < 0)
                return false;
            foreach (BlockSlot s in _late[late].Slots)
                _pool.Return(s);
            _late.RemoveAt(late);
            return true;
        }
    }

    public static byte[] Notification(ulong requestId, ulong nonce, int blocks)
    {
        var message = new byte[NotificationBytes];
        Magic.CopyTo(message, 0);
        BinaryPrimitives.WriteInt32LittleEndian(message.AsSpan(4), blocks);
        BinaryPrimitives.WriteUInt64LittleEndian(message.AsSpan(8), requestId);
        BinaryPrimitives.WriteUInt64LittleEndian(message.AsSpan(16), nonce);
        return message;
    }

    private async Task DispatchAsync()
    {
        try
        {
            await foreach (Notification n in _agent.Notifications.ReadAllAsync(_stop.Token).ConfigureAwait(false))
            {
                byte[] m = n.Message;
                if (m.Length == NotificationBytes && m.AsSpan(0, 4).SequenceEqual(CancelMagic))
                {
                    if (!Cancel(BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(8)), BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(16))))
                        Interlocked.Increment(ref _unknown);
                    continue;
                }

                if (m.Length != NotificationBytes || !m.AsSpan(0, 4).SequenceEqual(Magic))
                {
                    Interlocked.Increment(ref _unknown);
                    continue;
                }

                int blocks = BinaryPrimitives.ReadInt32LittleEndian(m.AsSpan(4));
                ulong id = BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(8));
                ulong nonce = BinaryPrimitives.ReadUInt64LittleEndian(m.AsSpan(16));
                lock (_lock)
                {
                    if (_pending.TryGetValue(id, out Pending? p) && p.Nonce == nonce && p.Slots.Length == blocks && p.Done.TrySetResult(p.Slots))
                    {
                        p.FilledAt = Now;
                        continue;
                    }
                }

                Interlocked.Increment(ref _unknown);
            }
        }
        catch (OperationCanceledException)
        {
            // stopping
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        await _dispatch.ConfigureAwait(false);
        lock (_lock)
        {
            foreach (Pending p in _pending.Values)
                p.Done.TrySetCanceled();
            _pending.Clear();
        }

        _stop.Dispose();
        // Out of the agent's reach before the memory goes: a late or foreign WRITE is then refused, never lands in freed memory.
        foreach (RegisteredRegion r in _regions)
            await _agent.DeregisterAsync(r).ConfigureAwait(false);
        _pool.Dispose();
    }
}

/// <summary>A request's hand-off is already taken by another decoder (a duplicated Decode): it belongs to that one.</summary>
public sealed class HandoffTakenException(string message) : InvalidOperationException(message);

/// <summary>
/// What a hand-off carries, slot by slot: the prompt's full KV blocks, its partial tail block (when the prompt does not
/// end on a block boundary), then the last prompt token's logits (F32, little-endian, as many slots as they need). The
/// decode side so starts from exactly what the prefill side computed and computes no prompt token itself.
/// </summary>
public static class HandoffLayout
{
    public static int LogitSlots(int vocab, int blockBytes) => ((vocab * sizeof(float)) + blockBytes - 1) / blockBytes;

    public static int Slots(int promptTokens, int tokensPerBlock, int vocab, int blockBytes)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(promptTokens, 1);
        return ((promptTokens + tokensPerBlock - 1) / tokensPerBlock) + LogitSlots(vocab, blockBytes);
    }

    public static void WriteLogits(ReadOnlySpan<float> logits, ReadOnlySpan<BlockSlot> slots, int blockBytes)
    {
        ReadOnlySpan<byte> bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(logits);
        for (int i = 0; i < slots.Length && !bytes.IsEmpty; i++)
        {
            int n = Math.Min(blockBytes, bytes.Length);
            bytes[..n].CopyTo(slots[i].AsSpan());
            bytes = bytes[n..];
        }
    }

    public static void ReadLogits(ReadOnlySpan<BlockSlot> slots, int blockBytes, Span<float> logits)
    {
        Span<byte> bytes = System.Runtime.InteropServices.MemoryMarshal.AsBytes(logits);
        if (slots.Length != LogitSlots(logits.Length, blockBytes))
            throw new InvalidOperationException($"the hand-off has {slots.Length} logit slots; {logits.Length} logits need {LogitSlots(logits.Length, blockBytes)}");
        for (int i = 0; i < slots.Length && !bytes.IsEmpty; i++)
        {
            int n = Math.Min(blockBytes, bytes.Length);
            slots[i].AsSpan()[..n].CopyTo(bytes);
            bytes = bytes[n..];
        }
    }
}

/// <summary>
/// The source of one hand-off on the prefill side: the addresses of a prefilled cache's blocks (full and tail, read in
/// place) and of slots rented from a registered pool holding the logits; dispose to return those slots (after the last
/// attempt of the WRITE).
/// </summary>
public sealed class HandoffSource : IDisposable
{
    private readonly HostBlockPool _pool;
    private readonly BlockSlot[] _logitSlots;
    private int _disposed;

    /// <param name="pool">Registered with the sending agent, slots of the cache's block size (the cache's own pool serves).</param>
    public HandoffSource(KvCache cache, ReadOnlySpan<float> logits, HostBlockPool pool)
    {
        int blockBytes = checked((int)cache.Layout.BlockBytes);
        if (pool.SlotBytes < blockBytes)
            throw new ArgumentException($"the pool's slots ({pool.SlotBytes} bytes) are smaller than a block ({blockBytes})", nameof(pool));
        int n = HandoffLayout.LogitSlots(logits.Length, blockBytes);
        _pool = pool;
        _logitSlots = new BlockSlot[n];
        for (int i = 0; i < n; i++)
        {
            if (!pool.TryRent(out _logitSlots[i]))
            {
                for (int j = 0; j < i; j++)
                    pool.Return(_logitSlots[j]);
                throw new InvalidOperationException($"pool exhausted: no slot left to stage the logits of the hand-off ({pool.Capacity} slots)");
            }
        }

        HandoffLayout.WriteLogits(logits, _logitSlots, blockBytes);
        int blocks = cache.BlockCount;
        var addresses = new nint[blocks + n];
        for (int i = 0; i < cache.FullBlocks; i++)
            addresses[i] = cache.BlockAddress(i);
        if (blocks > cache.FullBlocks)
            addresses[cache.FullBlocks] = cache.TailBlockAddress();
        for (int i = 0; i < n; i++)
            addresses[blocks + i] = _logitSlots[i].Address;
        Addresses = addresses;
    }

    public nint[] Addresses { get; }

    public void Dispose()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0)
            return;
        foreach (BlockSlot s in _logitSlots)
            _pool.Return(s);
    }
}

/// <summary>The prefill side: WRITEs a request's blocks (in memory registered with its agent) into a ticket's slots, then the notification.</summary>
public static class HandoffSender
{
    /// <param name="blocks">Addresses of the request's blocks, each ticket.BlockBytes long, inside regions registered with agent.</param>
    public static async Task<TransferResult> SendAsync(TransferAgent agent, RemoteAgent receiver, HandoffTicket ticket, ReadOnlyMemory<nint> blocks,
        ChecksumKind checksum = ChecksumKind.Crc32C, BackendKind backend = BackendKind.Auto, CancellationToken cancellationToken = default)
    {
        if (receiver.AgentId != ticket.ReceiverAgent)
            throw new ArgumentException($"the ticket is for agent {ticket.ReceiverAgent}, not {receiver.Name} ({receiver.AgentId})", nameof(ticket));
        if (blocks.Length != ticket.Addresses.Length)
            throw new ArgumentException($"{blocks.Length} blocks to send but the ticket reserved {ticket.Addresses.Length} slots", nameof(blocks));
        // Finish before the lease ends (less a margin), so the receiver never reclaims slots a WRITE is still filling.
        TimeSpan deadline = ticket.Remaining(TimeSpan.FromMilliseconds(100));
        if (deadline <= TimeSpan.Zero)
            return new TransferResult(TransferStatus.TimedOut, $"the hand-off lease of request {ticket.RequestId} ended before the KV could be sent");
        var local = new MemoryDescriptor[blocks.Length];
        var remote = new MemoryDescriptor[blocks.Length];
        for (int i = 0; i < local.Length; i++)
        {
            local[i] = MemoryDescriptor.Of(blocks.Span[i], ticket.BlockBytes);
            remote[i] = new MemoryDescriptor(ticket.Addresses[i], (ulong)ticket.BlockBytes);
        }

        TransferRequest write = agent.Prepare(TransferOp.Write, local, receiver, remote, new TransferOptions
        {
            Notification = HandoffReceiver.Notification(ticket.RequestId, ticket.Nonce, blocks.Length),
            Checksum = checksum,
            Deadline = deadline,
            Backend = backend,
        });
        return await agent.PostAsync(write, cancellationToken).ConfigureAwait(false);
    }
}
