namespace KvFabric.Transfer;

/// <summary>
/// The narrow contract every backend keeps (one folder each). A backend moves the chunks of a prepared request and
/// settles each chunk exactly once; it never throws for a per-chunk failure. After <see cref="AbortAsync"/> returns
/// null, it touches none of the request's memory again; when it returns a reason instead, it could not confirm that,
/// and the agent quarantines the request's memory until the task <see cref="StartAsync"/> returned has ended.
/// </summary>
internal interface ITransferBackend : IAsyncDisposable
{
    BackendKind Kind { get; }

    /// <summary>Whether this backend can reach every remote region in <paramref name="remoteRegions"/> of that peer.</summary>
    bool CanReach(RemoteAgent remote, ReadOnlySpan<int> remoteRegions, out string? why);

    /// <summary>Starts moving the chunks; the returned task ends when the backend has stopped touching local memory.</summary>
    Task StartAsync(TransferRequest request, CancellationToken cancellationToken);

    /// <summary>
    /// Stops all I/O of the request's current post and waits until none of it can touch memory: null then, or why
    /// that could not be confirmed (I/O may still land in the request's memory until its StartAsync task ends).
    /// </summary>
    Task<string?> AbortAsync(TransferRequest request);

    /// <summary>Forgets the per-peer state (connections, mappings) of a remote agent.</summary>
    ValueTask ForgetAsync(RemoteAgent remote);
}
