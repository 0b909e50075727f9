using KvFabric.Memory;

namespace KvFabric.Transfer;

public enum TransferOp : byte
{
    /// <summary>Copy remote bytes into local memory.</summary>
    Read = 1,
    /// <summary>Copy local bytes into remote memory.</summary>
    Write = 2,
}

public enum BackendKind : byte
{
    /// <summary>Same host and the remote region is mappable: shared memory; else TCP.</summary>
    Auto = 0,
    Tcp = 1,
    SharedMemory = 2,
    /// <summary>UCX (libucp): RDMA where a NIC exists, else whatever UCX_TLS allows (TCP, shared memory).</summary>
    Ucx = 3,
}

public enum ChecksumKind : byte
{
    None = 0,
    /// <summary>XXH3-64 through the system's libxxhash.</summary>
    XxHash3 = 1,
    /// <summary>CRC32C (Castagnoli) with the CPU's CRC instructions.</summary>
    Crc32C = 2,
}

/// <summary>The outcome of one descriptor of a transfer.</summary>
public enum DescriptorStatus : byte
{
    Pending = 0,
    Done = 1,
    /// <summary>The target refused it: unknown region, wrong key, or out of the region's bounds. Nothing was written.</summary>
    Refused = 2,
    /// <summary>The bytes arrived but their checksum did not match: do not use the destination.</summary>
    ChecksumMismatch = 3,
    PeerDisconnected = 4,
    TimedOut = 5,
    Cancelled = 6,
    Failed = 7,
}

public enum TransferStatus : byte
{
    Success = 0,
    Failed = 1,
    TimedOut = 2,
    Cancelled = 3,
}

/// <summary>A byte range in some agent's address space (NIXL's basic descriptor: address, length, device).</summary>
public readonly record struct MemoryDescriptor(ulong Address, ulong Length, int DeviceId = 0)
{
    public ulong End => Address + Length;
    public static MemoryDescriptor Of(nint address, long length) => new((ulong)address, (ulong)length);
    public override string ToString() => $"[0x{Address:x}, +{Length})";
}

/// <summary>The secret a peer must present to touch a region: it only has it if the owner exported that region to it.</summary>
public readonly record struct RegionKey(ulong Value)
{
    public override string ToString() => $"key:{Value:x16}";
}

/// <summary>Options of one prepared transfer.</summary>
public sealed record TransferOptions
{
    /// <summary>Delivered to the target's <see cref="TransferAgent.Notifications"/> only after every byte is in place and verified.</summary>
    public ReadOnlyMemory<byte>? Notification { get; init; }
    public ChecksumKind Checksum { get; init; } = ChecksumKind.None;
    /// <summary>A post that has not finished by then fails with <see cref="TransferStatus.TimedOut"/>.</summary>
    public TimeSpan Deadline { get; init; } = TimeSpan.FromSeconds(30);
    /// <summary>Overrides the backend chosen when the remote agent was loaded.</summary>
    public BackendKind Backend { get; init; } = BackendKind.Auto;
    /// <summary>Parallel streams (TCP connections, or copy threads for shared memory); 0 uses the agent's default.</summary>
    public int Streams { get; init; }
}

/// <summary>The overall result of one post; per-descriptor outcomes are on the request.</summary>
public readonly record struct TransferResult(TransferStatus Status, string? Error)
{
    public bool IsSuccess => Status == TransferStatus.Success;
    public override string ToString() => Error is null ? Status.ToString() : $"{Status}: {Error}";
}

/// <summary>A message a peer attached to a WRITE (or sent alone) that arrived after its data was in place.</summary>
public sealed record Notification(string FromAgent, Guid FromAgentId, byte[] Message);

/// <summary>Misuse of the transfer API: a bad descriptor, an unknown remote, a region that cannot be reached.</summary>
public sealed class TransferException(string message) : Exception(message);

/// <summary>A memory region this agent registered: transfers may touch only bytes inside such regions.</summary>
public sealed class RegisteredRegion : IAddressRange
{
    internal RegisteredRegion(uint id, INativeMemory? memory, MemoryKind kind, ulong address, ulong length, int deviceId, RegionKey key, string? mappedPath)
    {
        Id = id;
        Memory = memory;
        Kind = kind;
        Address = address;
        Length = length;
        DeviceId = deviceId;
        Key = key;
        MappedPath = mappedPath;
    }

    public uint Id { get; }
    public MemoryKind Kind { get; }
    public ulong Address { get; }
    public ulong Length { get; }
    public int DeviceId { get; }
    public RegionKey Key { get; }
    public string? MappedPath { get; }
    internal INativeMemory? Memory { get; }
    /// <summary>The device and allocation of a device region (its address is a device address), else null.</summary>
    internal Cuda.DeviceRegion? Device { get; set; }
    /// <summary>The agent's own memory (device staging): never exported, never a target of a peer's transfer.</summary>
    internal bool Internal { get; set; }
    ulong IAddressRange.Start => Address;
    ulong IAddressRange.End => Address + Length;
    public MemoryDescriptor Descriptor(ulong offset, ulong length) => new(Address + offset, length, DeviceId);
    public MemoryDescriptor Descriptor() => new(Address, Length, DeviceId);

    // Transfers in flight hold a reference so deregistration waits for them instead of pulling memory from under a copy.
    private int _users;
    private int _closed;
    // Completed once the region is closed and no transfer holds it; created before _closed is set (see CloseAsync).
    private TaskCompletionSource? _idle;
    private TaskCompletionSource? _deregistered;

    /// <summary>Closed to new transfers: being deregistered (a deregistration may have timed out and be retried) or deregistered.</summary>
    internal bool Closing => Volatile.Read(ref _closed) != 0;

    internal bool TryAcquire()
    {
        Interlocked.Increment(ref _users);
        if (Volatile.Read(ref _closed) == 0)
            return true;
        Release(); // may be the last reference a closing region waits on (its CloseAsync counted this one)
        return false;
    }

    internal void Release()
    {
        // Interlocked.Decrement is a full fence: if CloseAsync set _closed before it, we see _closed and the _idle it
        // published first; if after, CloseAsync sees our decrement when it counts the users.
        if (Interlocked.Decrement(ref _users) == 0 && Volatile.Read(ref _closed) != 0)
            Volatile.Read(ref _idle)?.TrySetResult();
    }

    /// <summary>
    /// Closes the region to new transfers (for good) and waits, bounded, for the ones holding it to release it. A timeout
    /// leaves it closed, and a later call waits again.
    /// </summary>
    internal async Task CloseAsync(TimeSpan timeout)
    {
        Interlocked.CompareExchange(ref _idle, new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously), null);
        var idle = _idle!;
        Interlocked.Exchange(ref _closed, 1); // a full fence: no TryAcquire or Release can miss it while we count users
        if (Volatile.Read(ref _users) == 0)
            idle.TrySetResult();
        // WaitAsync takes at most about 49 days (and -1 ms for infinite): longer is infinite, negative is now.
        var wait = timeout == Timeout.InfiniteTimeSpan || timeout.TotalMilliseconds >= uint.MaxValue - 1.0 ? Timeout.InfiniteTimeSpan
            : timeout < TimeSpan.Zero ? TimeSpan.Zero : timeout;
        try
        {
            await idle.Task.WaitAsync(wait).ConfigureAwait(false);
        }
        catch (TimeoutException)
        {
            throw new TimeoutException($"a transfer still uses region {Id} after {timeout.TotalSeconds:0.###} s (still in use by {Volatile.Read(ref _users)}): "
                + "it stays registered and closed to new transfers; retry DeregisterAsync, and do not free or reuse the memory until it returns");
        }
    }

    /// <summary>
    /// Claims the final step of deregistration (leaving the registry, unmapping): true for the one caller that gets
    /// it, which completes <see cref="Deregistered"/> when done; false for any other, which awaits it.
    /// </summary>
    internal bool TryClaimDeregistration(out Task deregistered)
    {
        var mine = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        var winner = Interlocked.CompareExchange(ref _deregistered, mine, null);
        deregistered = (winner ?? mine).Task;
        return winner is null;
    }

    internal void Deregistered() => Volatile.Read(ref _deregistered)?.TrySetResult();

    public override string ToString() => $"region {Id} ({Kind}) [0x{Address:x}, +{Length})";
}
