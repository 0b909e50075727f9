using Google.Protobuf;
using KvFabric.Client.Grpc;

namespace KvFabric.Rpc;

/// <summary>The method table: "/package.Service/Method" to a handler, for each of gRPC's four call shapes.</summary>
public sealed class GrpcRouter
{
    private readonly Dictionary<string, Route> _routes = new(StringComparer.Ordinal);

    /// <param name="Watch">
    /// A long-lived stream that only waits for changes (health Watch, SubscribeEvents): at shutdown it ends at once (as
    /// UNAVAILABLE, so its client resubscribes elsewhere) instead of holding the drain period that calls doing work get.
    /// </param>
    internal sealed record Route(string Path, bool Authenticated, Func<ServerCall, Task> Handler, bool Watch = false);

    public IEnumerable<string> Paths => _routes.Keys;

    public IEnumerable<string> Services => _routes.Keys.Select(p => p.Split('/', StringSplitOptions.RemoveEmptyEntries)[0]).Distinct();

    internal bool TryGet(string path, out Route route) => _routes.TryGetValue(path, out route!);

    /// <param name="undelivered">
    /// Undoes what the handler did when its response could not be delivered (the client reset the stream or the write
    /// failed): for calls that hand out something only the response names (a reservation, a lease), which nobody could
    /// otherwise release before it expires.
    /// </param>
    public void Unary<TReq, TResp>(string path, MessageParser<TReq> parser, Func<TReq, ServerCall, Task<TResp>> handler, bool authenticated = true,
        Action<TReq, TResp, ServerCall>? undelivered = null)
        where TReq : class, IMessage<TReq> where TResp : IMessage<TResp> =>
        Add(path, authenticated, async call =>
        {
            TReq request = await ReadSingleAsync(call, parser).ConfigureAwait(false);
            TResp response = await handler(request, call).ConfigureAwait(false);
            bool delivered = false;
            try
            {
                await call.WriteLastAsync(response).ConfigureAwait(false);
                delivered = !call.ClientGone; // a client that reset the stream never gets the status that completes the call
            }
            finally
            {
                if (!delivered)
                    undelivered?.Invoke(request, response, call);
            }
        });

    /// <param name="watch">A stream that only waits for changes and ends at once at shutdown (see <see cref="Route.Watch"/>).</param>
    public void ServerStreaming<TReq>(string path, MessageParser<TReq> parser, Func<TReq, ServerCall, Task> handler, bool authenticated = true,
        bool watch = false)
        where TReq : class, IMessage<TReq> =>
        Add(path, authenticated, async call =>
        {
            TReq request = await ReadSingleAsync(call, parser).ConfigureAwait(false);
            await handler(request, call).ConfigureAwait(false);
        }, watch);

    public void ClientStreaming<TResp>(string path, Func<ServerCall, Task<TResp>> handler, bool authenticated = true)
        where TResp : IMessage<TResp> =>
        Add(path, authenticated, async call =>
        {
            TResp response = await handler(call).ConfigureAwait(false);
            await call.WriteLastAsync(response).ConfigureAwait(false);
        });

    public void Bidirectional(string path, Func<ServerCall, Task> handler, bool authenticated = true) =>
        Add(path, authenticated, async call =>
        {
            await call.StartResponseAsync().ConfigureAwait(false);
            await handler(call).ConfigureAwait(false);
        });

    private void Add(string path, bool authenticated, Func<ServerCall, Task> handler, bool watch = false)
    {
        if (!path.StartsWith('/') || path.Count(c => c == '/') != 2)
            throw new ArgumentException($"a gRPC method path looks like /package.Service/Method; got '{path}'", nameof(path));
        if (!_routes.TryAdd(path, new Route(path, authenticated, handler, watch)))
            throw new ArgumentException($"{path} is registered twice", nameof(path));
    }

    private static async Task<TReq> ReadSingleAsync<TReq>(ServerCall call, MessageParser<TReq> parser) where TReq : class, IMessage<TReq>
    {
        TReq request = await call.ReadAsync(parser).ConfigureAwait(false)
            ?? throw new RpcException(StatusCode.Internal, $"{call.Method} expects exactly one request message; the stream ended without one");
        if (await call.ReadAsync(parser).ConfigureAwait(false) is not null)
            throw new RpcException(StatusCode.Internal, $"{call.Method} expects exactly one request message; the client sent more");
        return request;
    }
}
