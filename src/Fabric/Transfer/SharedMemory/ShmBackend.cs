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
        if (!full.StartsWith(root, StringComparison.Ordinal))
            return false;
        // The path is a peer's: no directory between the shared directory and the file may be a link (one planted there
        // would lead outside it; the file itself is opened with O_NOFOLLOW).
        for (string? d = Path.GetDirectoryName(full); d is not null && d.Length >= root.Length; d = Path.GetDirectoryName(d))
        {
            if (new DirectoryInfo(d).LinkTarget is not null)
                return false;
        }
        return true;
    }

    /// <summary>
    /// The mappings of one peer's regions, reference-counted: the peer's view (<see cref="RemoteAgent.ShmState"/>) holds
    /// one reference and every post holds one per copying stripe. Forgetting the peer drops the view's reference and
    /// closes it to new posts; the mappings are unmapped only when the last reference goes, so a copy that is still
    /// running (a post's deadline may be far off) never has its mapping removed under it.
    /// </summary>
    private sealed class PeerMaps(int count)
    {
        private readonly MappedMemory?[] _maps = new MappedMemory?[count];
        private readonly Lock _lock = new();
        private int _refs = 1; // the peer view's own reference
        private int _closed;

        /// <summary>A reference for a post; false once the peer was forgotten (its mappings are going).</summary>
        public bool TryAcquire()
        {
            while (true)
            {
                int refs = Volatile.Read(ref _refs);
                if (refs == 0 || Volatile.Read(ref _closed) != 0)
                    return false;
                if (Interlocked.CompareExchange(ref _refs, refs + 1, refs) == refs)
                    return true;
            }
        }

        /// <summary>More references for a holder that already has one (a post's further stripes).</summary>
        public void AddRefs(int count) => Interlocked.Add(ref _refs, count);

        public void Release()
        {
            int left = Interlocked.Decrement(ref _refs);
            if (left == 0)
            {
                foreach (var m in _maps)
                    m?.Dispose();
            }
            else if (left < 0)
            {
                throw new InvalidOperationException("shared-memory peer mappings released more often than acquired");
            }
        }

        /// <summary>Closes the peer to new posts and drops the view's reference (once).</summary>
        public void Close()
        {
            if (Interlocked.Exchange(ref _closed, 1) == 0)
                Release();
        }

        /// <summary>The mapping of a region, mapped on first use; the caller holds a reference.</summary>
        public MappedMemory Map(RemoteAgent remote, int regionIndex)
        {
            if (Volatile.Read(ref _maps[regionIndex]) is { } ready)
                return ready;
            lock (_lock)
            {
                if (_maps[regionIndex] is { } raced)
                    return raced;
                var info = remote.Metadata.Regions[regionIndex];
                var map = info.Kind == MemoryKind.SharedHost
                    ? SharedMemorySegment.Open(info.MappedPath!, (long)info.Length)
                    : MappedMemory.Open(info.MappedPath!, (long)info.Length, MemoryKind.File);
                Volatile.Write(ref _maps[regionIndex], map);
                return map;
            }
        }
    }

    /// <summary>Stands in for the forgotten peer's state: no post may map its regions again.</summary>
    private static readonly object Forgotten = new();

    /// <summary>A reference to the peer's mappings for a post, or null once the peer was unloaded or reloaded.</summary>
    private static PeerMaps? Acquire(RemoteAgent remote)
    {
        while (true)
        {
            switch (Volatile.Read(ref remote.ShmState))
            {
                case PeerMaps maps:
                    // A failed acquire means forget closed it: ShmState is (or is about to be) Forgotten.
                    return maps.TryAcquire() ? maps : null;
                case null:
                    // First post to this peer: install the mappings (or lose the race to another post, or to a forget),
                    // then look again.
                    Interlocked.CompareExchange(ref remote.ShmState, new PeerMaps(remote.Metadata.Regions.Count), null);
                    continue;
                default:
                    return null; // Forgotten
            }
        }
    }

    /// <summary>Test hook: called before each chunk's copy with the mapping it copies through (null in production).</summary>
    internal Action<MappedMemory>? BeforeCopy;

    public Task StartAsync(TransferRequest request, CancellationToken ct)
    {
        var maps = Acquire(request.Remote);
        if (maps is null)
        {
            request.SettleAllPending(DescriptorStatus.PeerDisconnected,
                $"remote agent '{request.Remote.Name}' was unloaded or reloaded while this post started: its shared-memory mappings are gone; prepare against the RemoteAgent LoadRemoteAsync returned last");
            request.BackendState = Task.CompletedTask;
            return Task.CompletedTask;
        }
        int streams = Math.Min(request.Streams, request.Chunks.Length);
        // One reference per stripe, dropped when that stripe stops copying: the last one after a forget unmaps.
        maps.AddRefs(streams - 1);
        Task work = streams == 1
            ? Task.Run(() => CopyStripe(request, maps, 0, 1, ct), CancellationToken.None)
            : Task.WhenAll(Enumerable.Range(0, streams).Select(s => Task.Run(() => CopyStripe(request, maps, s, streams, ct), CancellationToken.None)));
        request.BackendState = work;
        return work;
    }

    private unsafe void CopyStripe(TransferRequest request, PeerMaps maps, int stream, int streams, CancellationToken ct)
    {
        try
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
                    map = maps.Map(request.Remote, c.RemoteRegion);
                }
                catch (Exception e) when (e is IOException or UnauthorizedAccessException or ArgumentException)
                {
                    request.Settle(i, DescriptorStatus.PeerDisconnected, $"cannot map the peer's segment: {e.Message}");
                    continue;
                }
                BeforeCopy?.Invoke(map);
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
        finally
        {
            maps.Release();
        }
    }

    public async Task<string?> AbortAsync(TransferRequest request)
    {
        // Copies stop at the next chunk boundary once the token is cancelled; wait for the one in progress.
        if (request.BackendState is Task work)
            await work.ConfigureAwait(false);
        return null;
    }

    /// <summary>
    /// Closes the peer's mappings to new posts and drops the view's reference at once, without waiting for copies in
    /// flight: each mapping is unmapped when the last post copying through it stops.
    /// </summary>
    public ValueTask ForgetAsync(RemoteAgent remote)
    {
        if (Interlocked.Exchange(ref remote.ShmState, Forgotten) is PeerMaps maps)
            maps.Close();
        return ValueTask.CompletedTask;
    }

    public ValueTask DisposeAsync() => ValueTask.CompletedTask;
}
