using KvFabric.Memory;

namespace KvFabric.Transfer.Ucx;

/// <summary>
/// Host memory UCX allocated for this agent (<see cref="TransferAgent.AllocateUcx"/>), registered as one region. On
/// transports that map a peer's memory (posix, sysv) a peer's put or get into it is a single copy; memory allocated
/// elsewhere is reached through active messages there. It lives until its region is deregistered or the agent is
/// disposed; after that <see cref="Address"/> throws instead of pointing at unmapped memory. Disposing it deregisters
/// its region (waiting for transfers in flight on it, as <see cref="TransferAgent.DeregisterAsync"/> does), so an owner
/// such as a <see cref="HostBlockPool"/> built with <see cref="HostBlockPoolOptions.Allocator"/> gives it back.
/// </summary>
public sealed class UcxMemory : INativeMemory, IDisposable
{
    private nint _address;

    internal UcxMemory(nint address, long length)
    {
        _address = address;
        Length = length;
    }

    /// <summary>The agent that allocated it (set by AllocateUcx): disposing deregisters the region there.</summary>
    internal TransferAgent? Agent { get; set; }

    public nint Address => _address != 0 ? _address : throw new ObjectDisposedException(nameof(UcxMemory), "this UCX allocation was freed when its region was deregistered");
    public long Length { get; }
    public MemoryKind Kind => MemoryKind.Host;
    public string? MappedPath => null;
    /// <summary>The region this memory is registered as.</summary>
    public RegisteredRegion Region { get; internal set; } = null!;

    public unsafe Span<byte> GetSpan(long offset, int length)
    {
        if (offset < 0 || length < 0 || offset > Length || length > Length - offset)
            throw new ArgumentOutOfRangeException(nameof(offset), $"[{offset}, +{length}) is outside this {Length}-byte UCX allocation");
        return new Span<byte>((byte*)Address + offset, length);
    }

    internal void MarkFreed() => _address = 0;

    public void Dispose()
    {
        if (Volatile.Read(ref _address) == 0 || Agent is not { } agent)
            return;
        try
        {
            agent.DeregisterAsync(Region).GetAwaiter().GetResult();
        }
        catch (TransferException) when (Volatile.Read(ref _address) == 0)
        {
            // freed meanwhile (its region deregistered or the agent disposed): nothing left to give back
        }
    }
}
