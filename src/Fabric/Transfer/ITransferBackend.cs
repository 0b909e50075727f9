namespace KvFabric.Transfer;

/// <summary>
/// The narrow contract every backend keeps (one folder each). A backend moves the chunks of a prepared request and
/// settles each chunk exactly once; it never throws for a per-chunk failure. After <see cref="AbortAsync"/> returns,
/// it touches none of the request's memory again.
/// </summary>
internal interface ITransferBackend : IAsyncDisposable
{
    BackendKind Kind { get; }

    /// <summary>Whether this backend can reach every remote region in <paramref name="remoteRegions"/> of that peer.</summary>
    bool CanReach(RemoteAgent remote, ReadOnlySpan<int> remoteRegions, out string? why);

    /// <summary>Starts moving the chunks; the returned task ends when the backend has stopped touching local memory.</summary>
    Task StartAsync(TransferRequest request, CancellationToken cancellationToken);

    /// <summary>Stops all I/O of the request's current post and waits until none of it can touch memory.</summary>
    Task AbortAsync(TransferRequest request);

    /// <summary>Forgets the per-peer state (connections, mappings) of a remote agent.</summary>
    ValueTask ForgetAsync(RemoteAgent remote);
}
