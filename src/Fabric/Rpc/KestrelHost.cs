using System.Net;
using System.Security.Cryptography.X509Certificates;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Hosting.Server;
using Microsoft.AspNetCore.Hosting.Server.Features;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;

namespace KvFabric.Rpc;

/// <summary>The Kestrel server every gRPC service of this project runs on (the sidecar's, a worker's): one listener, tuned for long streams and big messages.</summary>
public static class KestrelHost
{
    /// <summary>How long a connection may stay silent before it is PINGed (HTTP/2); see <see cref="Build"/>.</summary>
    public static readonly TimeSpan DefaultKeepAlive = TimeSpan.FromSeconds(60);

    /// <summary>
    /// A web application listening on address:port (0: any free port) with the given protocols; TLS when cert is set.
    /// An HTTP/2 client silent for keepAlive is PINGed, and dropped (its calls cancelled) if it does not answer within
    /// keepAlive (at most 20 s): without it a frozen or partitioned client's calls would never end. On stop, calls still
    /// running after shutdownTimeout (default 5 s) are cut off (their connections aborted).
    /// </summary>
    public static WebApplication Build(IPAddress address, int port, HttpProtocols protocols, X509Certificate2? cert, ILoggerFactory logs,
        TimeSpan? keepAlive = null, TimeSpan? shutdownTimeout = null)
    {
        TimeSpan ping = keepAlive ?? DefaultKeepAlive;
        WebApplicationBuilder builder = WebApplication.CreateSlimBuilder();
        builder.Logging.ClearProviders();
        builder.Services.AddSingleton(logs);
        builder.WebHost.ConfigureKestrel(k =>
        {
            k.AddServerHeader = false;
            k.Limits.MaxRequestBodySize = null;            // streams are bounded per message, not per call
            k.Limits.MinRequestBodyDataRate = null;        // long-lived streams (Watch, SubscribeEvents) sit idle
            k.Limits.MinResponseDataRate = null;
            k.Limits.Http2.MaxStreamsPerConnection = 1024;
            k.Limits.Http2.InitialConnectionWindowSize = 32 << 20;
            k.Limits.Http2.InitialStreamWindowSize = 16 << 20;
            k.Limits.Http2.MaxFrameSize = (1 << 24) - 1;
            k.Limits.Http2.KeepAlivePingDelay = ping;
            k.Limits.Http2.KeepAlivePingTimeout = ping < TimeSpan.FromSeconds(20) ? ping : TimeSpan.FromSeconds(20);
            k.Listen(address, port, listen =>
            {
                listen.Protocols = protocols;
                if (cert is not null)
                    listen.UseHttps(cert);
            });
        });
        builder.WebHost.UseShutdownTimeout(shutdownTimeout ?? TimeSpan.FromSeconds(5));
        return builder.Build();
    }

    /// <summary>The endpoint a started application is bound to (the real port when 0 was asked for).</summary>
    public static IPEndPoint BoundEndpoint(WebApplication app)
    {
        string address = app.Services.GetRequiredService<IServer>().Features.Get<IServerAddressesFeature>()!.Addresses.First();
        var uri = new Uri(address.Replace("[::]", "127.0.0.1", StringComparison.Ordinal));
        return new IPEndPoint(IPAddress.Parse(uri.Host.Trim('[', ']')), uri.Port);
    }
}
