using Grpc.Health.V1;
using KvFabric.Client.Grpc;
using static Grpc.Health.V1.HealthCheckResponse.Types;

namespace KvFabric.Rpc;

/// <summary>grpc.health.v1.Health (Check and Watch), per the standard protocol; no authentication, so any probe works.</summary>
public sealed class HealthService
{
    public const string Name = "grpc.health.v1.Health";
    private readonly Dictionary<string, ServingStatus> _status = new(StringComparer.Ordinal);
    private readonly Lock _lock = new();
    private TaskCompletionSource _changed = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public HealthService(IEnumerable<string> services)
    {
        _status[string.Empty] = ServingStatus.Serving;
        foreach (string s in services)
            _status[s] = ServingStatus.Serving;
    }

    /// <summary>Sets the status of one service ("" for the whole server); Watch streams see the change.</summary>
    public void Set(string service, ServingStatus status)
    {
        TaskCompletionSource changed;
        lock (_lock)
        {
            _status[service] = status;
            changed = _changed;
            _changed = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }

        changed.TrySetResult();
    }

    /// <summary>Marks everything NOT_SERVING (at shutdown, so load balancers drain the node first).</summary>
    public void SetAllNotServing()
    {
        lock (_lock)
        {
            foreach (string k in _status.Keys.ToList())
                _status[k] = ServingStatus.NotServing;
        }

        Set(string.Empty, ServingStatus.NotServing);
    }

    public void Register(GrpcRouter router)
    {
        router.Unary<HealthCheckRequest, HealthCheckResponse>($"/{Name}/Check", HealthCheckRequest.Parser, (r, _) =>
        {
            lock (_lock)
            {
                return _status.TryGetValue(r.Service, out ServingStatus s)
                    ? Task.FromResult(new HealthCheckResponse { Status = s })
                    : throw new RpcException(StatusCode.NotFound, $"unknown service '{r.Service}'");
            }
        }, authenticated: false);
        router.ServerStreaming<HealthCheckRequest>($"/{Name}/Watch", HealthCheckRequest.Parser, WatchAsync, authenticated: false, watch: true);
    }

    private async Task WatchAsync(HealthCheckRequest request, ServerCall call)
    {
        ServingStatus? last = null;
        try
        {
            while (true)
            {
                ServingStatus now = Current(request.Service, out Task changed);
                if (now != last)
                {
                    last = now; // in the response body from here on, even if the flush below is cut off
                    await call.WriteAsync(new HealthCheckResponse { Status = now }).ConfigureAwait(false);
                }

                await changed.WaitAsync(call.CancellationToken).ConfigureAwait(false);
            }
        }
        catch (OperationCanceledException) when (call.ShuttingDown)
        {
            // The shutdown ends watches as it sets NOT_SERVING: whichever came first, the watcher hears the last status
            // (it goes out with the UNAVAILABLE that ends the stream) before it turns to another node.
            ServingStatus now = Current(request.Service, out _);
            if (now != last)
                call.Write(new HealthCheckResponse { Status = now });
            throw;
        }
    }

    private ServingStatus Current(string service, out Task changed)
    {
        lock (_lock)
        {
            changed = _changed.Task;
            return _status.TryGetValue(service, out ServingStatus s) ? s : ServingStatus.ServiceUnknown;
        }
    }
}
