using KvFabric.Memory;

namespace KvFabric.Transfer.SharedMemory;

/// <summary>
/// Same host, different processes: the initiator maps the peer's exported segments (or files) and copies straight
/// between its own memory and the mapping: one copy, no kernel socket path. Integrity is checked by hashing the
/// source before and the destination after the copy. The peer confirms liveness through the agent's control channel
/// (a fence or the notification), so a transfer into a dead process's memory is never reported done.
/// </summary>
internal sealed class ShmBackend(TransferAgent agent) : ITransferBackend
{
    public BackendKind Kind => BackendKind.SharedMemory;

    public bool CanReach(RemoteAgent remote, ReadOnlySpan<int> remoteRegions, out string? why)
    {
        if (!remote.SameHost)
        {
            why = $"agent '{remote.Name}' runs on another host ({remote.Metadata.HostId})";
            return false;
        }
        foreach (int r in remoteRegions)
        {
            var region = remote.Metadata.Regions[r];
            if (region.MappedPath is null || region.Kind is not (MemoryKind.SharedHost or MemoryKind.File))
            {
                why = $"remote region {region.Id} ({region.Kind}) is not in a shared segment this process can map";
                return false;
            }
            if (region.Kind == MemoryKind.SharedHost && !SharedMemorySegment.IsSegmentPath(region.MappedPath))
            {
                why = $"remote region {region.Id} names '{region.MappedPath}', which is not a KvFabric segment in {SharedMemorySegment.Directory}";
                return false;
            }
            if (region.Kind == MemoryKind.File && !InsideSharedFileDirectory(region.MappedPath))
            {
                why = $"remote file region {region.Id} ({region.MappedPath}) is outside SharedFileDirectory, so it is reached over TCP only";
                return false;
            }
        }
        why = null;
        return true;
    }

    private bool InsideSharedFileDirectory(string path)
    {
        if (agent.Options.SharedFileDirectory is not { } dir)
            return false;
        string full = Path.GetFullPath(path);
        string root = Path.TrimEndingDirectorySeparator(Path.GetFullPath(dir)) + Path.DirectorySeparatorChar;
        return full.StartsWith(root, StringComparison.Ordinal);
    }

    private sealed class PeerMaps(int count)
    {
        public readonly MappedMemory?[] Maps = new MappedMemory?[count];
        public readonly Lock Lock = new();
    }

    private MappedMemory Map(RemoteAgent remote, int regionIndex)
    {
        var maps = remote.ShmState as PeerMaps;
        if (maps is null)
        {
            var created = new PeerMaps(remote.Metadata.Regions.Count);
            maps = Interlocked.CompareExchange(ref remote.ShmState, created, null) as PeerMaps ?? created;
        }
        if (maps.Maps[regionIndex] is { } ready)
            return ready;
        lock (maps.Lock)
        {
            if (maps.Maps[regionIndex] is { } raced)
                return raced;
            var info = remote.Metadata.Regions[regionIndex];
            var map = info.Kind == MemoryKind.SharedHost
                ? SharedMemorySegment.Open(info.MappedPath!, (long)info.Length)
                : MappedMemory.Open(info.MappedPath!, (long)info.Length, MemoryKind.File);
            maps.Maps[regionIndex] = map;
            return map;
        }
    }

    public Task StartAsync(TransferRequest request, CancellationToken ct)
    {
        int streams = Math.Min(request.Streams, request.Chunks.Length);
        Task work = streams == 1
            ? Task.Run(() => CopyStripe(request, 0, 1, ct), CancellationToken.None)
            : Task.WhenAll(Enumerable.Range(0, streams).Select(s => Task.Run(() => CopyStripe(request, s, streams, ct), CancellationToken.None)));
        request.BackendState = work;
        return work;
    }

    private unsafe void CopyStripe(TransferRequest request, int stream, int streams, CancellationToken ct)
    {
        var chunks = request.Chunks;
        var checksum = request.Options.Checksum;
        var faults = agent.Options.Faults;
        for (int i = stream; i < chunks.Length; i += streams)
        {
            if (ct.IsCancellationRequested)
                return; // the agent settles the rest as timed out or cancelled
            var c = chunks[i];
            MappedMemory map;
            try
            {
                map = Map(request.Remote, c.RemoteRegion);
            }
            catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
            {
                request.Settle(i, DescriptorStatus.PeerDisconnected, $"cannot map the peer's segment: {e.Message}");
                continue;
            }
            nint remote = map.Address + (nint)c.RemoteOffset;
            (nint src, nint dst) = request.Op == TransferOp.Write ? (c.Local, remote) : (remote, c.Local);
            ulong expected = checksum == ChecksumKind.None ? 0 : Checksums.Compute(checksum, src, c.Length);
            Buffer.MemoryCopy((void*)src, (void*)dst, c.Length, c.Length);
            if (faults?.ShouldCorrupt() == true)
                ((byte*)dst)[c.Length / 2] ^= 0x5A;
            if (checksum != ChecksumKind.None && Checksums.Compute(checksum, dst, c.Length) != expected)
            {
                request.Settle(i, DescriptorStatus.ChecksumMismatch, "checksum mismatch at the destination after the shared-memory copy");
                continue;
            }
            agent.CountBytes(BackendKind.SharedMemory, (uint)c.Length, received: request.Op == TransferOp.Read);
            request.Settle(i, DescriptorStatus.Done);
        }
    }

    public async Task AbortAsync(TransferRequest request)
    {
        // Copies stop at the next chunk boundary once the token is cancelled; wait for the one in progress.
        if (request.BackendState is Task work)
            await work.ConfigureAwait(false);
    }

    public ValueTask ForgetAsync(RemoteAgent remote)
    {
        if (Interlocked.Exchange(ref remote.ShmState, null) is PeerMaps maps)
        {
            foreach (var m in maps.Maps)
                m?.Dispose();
        }
        return ValueTask.CompletedTask;
    }

    public ValueTask DisposeAsync() => ValueTask.CompletedTask;
}
