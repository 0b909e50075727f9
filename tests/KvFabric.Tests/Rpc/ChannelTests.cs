using System.Net;
using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

public sealed class ChannelTests(SidecarFixture fx) : IClassFixture<SidecarFixture>
{
    /// <summary>Fails the first N sends before they reach the network, as a refused connection would.</summary>
    private sealed class FlakyHandler(int failures) : DelegatingHandler(new SocketsHttpHandler())
    {
        public int Attempts;

        protected override Task<HttpResponseMessage> SendAsync(HttpRequestMessage request, CancellationToken cancellationToken) =>
            Interlocked.Increment(ref Attempts) <= failures
                ? Task.FromException<HttpResponseMessage>(new HttpRequestException("connection refused (injected)"))
                : base.SendAsync(request, cancellationToken);
    }

    [Fact]
    public async Task Idempotent_calls_are_retried_on_unavailable_and_others_are_not()
    {
        using var flaky = new FlakyHandler(2);
        using var client = new FabricClient(new RpcChannelOptions
        {
            Address = new Uri(fx.Address), Tenant = "alpha", Token = "alpha-token", Handler = flaky, RetryBackoff = TimeSpan.FromMilliseconds(1),
        });
        Assert.Equal(0u, (await client.LookupAsync(TestBlocks.Packed(TestBlocks.Chain("retry", 1)))).MatchedBlocks);
        Assert.Equal(3, flaky.Attempts);

        using var flakyPut = new FlakyHandler(1);
        using var putClient = new FabricClient(new RpcChannelOptions
        {
            Address = new Uri(fx.Address), Tenant = "alpha", Token = "alpha-token", Handler = flakyPut, RetryBackoff = TimeSpan.FromMilliseconds(1),
        });
        var e = await Assert.ThrowsAsync<RpcException>(() => putClient.ReserveAsync(1));
        Assert.Equal(StatusCode.Unavailable, e.Status);
        Assert.Equal(1, flakyPut.Attempts);
    }

    [Fact]
    public async Task A_dead_server_is_unavailable_within_the_deadline()
    {
        var listener = new System.Net.Sockets.TcpListener(IPAddress.Loopback, 0);
        listener.Start();
        int port = ((IPEndPoint)listener.LocalEndpoint).Port;
        listener.Stop(); // nothing listens there now
        using var client = new FabricClient(new RpcChannelOptions
        {
            Address = new Uri($"http://127.0.0.1:{port}"), Tenant = "alpha", Token = "alpha-token", MaxRetries = 1, RetryBackoff = TimeSpan.FromMilliseconds(1),
        });
        var e = await Assert.ThrowsAsync<RpcException>(() => client.StatsAsync(new CallOptions(Deadline: TimeSpan.FromSeconds(5))));
        Assert.Equal(StatusCode.Unavailable, e.Status);
        Assert.Contains($"127.0.0.1:{port}", e.Detail, StringComparison.Ordinal);
    }

    [Fact]
    public async Task The_sidecar_serves_grpc_over_tls_when_given_a_certificate()
    {
        string dir = Directory.CreateTempSubdirectory("kvfabric-tls-").FullName;
        try
        {
            using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
            var req = new CertificateRequest("CN=localhost", key, HashAlgorithmName.SHA256);
            var san = new SubjectAlternativeNameBuilder();
            san.AddIpAddress(IPAddress.Loopback);
            san.AddDnsName("localhost");
            req.CertificateExtensions.Add(san.Build());
            using X509Certificate2 cert = req.CreateSelfSigned(DateTimeOffset.UtcNow.AddMinutes(-5), DateTimeOffset.UtcNow.AddDays(1));
            File.WriteAllText(Path.Combine(dir, "cert.pem"), cert.ExportCertificatePem());
            File.WriteAllText(Path.Combine(dir, "key.pem"), key.ExportPkcs8PrivateKeyPem());

            await using var host = new SidecarHost(new SidecarOptions
            {
                Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20, StagingSlots = 1,
                TlsCertificate = Path.Combine(dir, "cert.pem"), TlsKey = Path.Combine(dir, "key.pem"),
            }, NullLoggerFactory.Instance);
            await host.StartAsync();
            string thumbprint = cert.Thumbprint;
            using var client = new FabricClient(new RpcChannelOptions
            {
                Address = new Uri($"https://{host.GrpcEndpoint}"), Tenant = "dev", Token = "dev",
                ServerCertificateValidation = (_, presented, _, _) => presented?.GetCertHashString() == thumbprint,
            });
            var chain = TestBlocks.Chain("tls", 1);
            Assert.Equal(1u, (await client.PutAsync(TestBlocks.ToPut(chain, fx.BlockBytes, 3))).Stored);
            Assert.Equal(1u, (await client.LookupAsync(TestBlocks.Packed(chain))).MatchedBlocks);

            using var untrusting = new FabricClient(new RpcChannelOptions { Address = new Uri($"https://{host.GrpcEndpoint}"), Tenant = "dev", Token = "dev", MaxRetries = 0 });
            var e = await Assert.ThrowsAsync<RpcException>(() => untrusting.StatsAsync());
            Assert.Equal(StatusCode.Unavailable, e.Status); // the self-signed certificate is not trusted by default
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Dev_mode_refuses_to_bind_anything_but_loopback()
    {
        var e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Dev = true, Listen = IPAddress.Any }.Validate());
        Assert.Contains("loopback", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => new SidecarOptions { Dev = false }.Validate()); // no tenants
    }

    [Fact]
    public void A_cluster_node_listening_on_every_address_must_say_where_it_is_reached()
    {
        var tenants = new[] { new KvFabric.Rpc.TenantConfig("ops", "secret-token", Admin: true) };
        var e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Listen = IPAddress.Any, Cluster = "etcd", Tenants = tenants }.Validate());
        Assert.Contains("advertise", e.Message, StringComparison.Ordinal);
        new SidecarOptions { Listen = IPAddress.Any, Cluster = "etcd", Tenants = tenants, Advertise = "http://10.0.0.5:50051" }.Validate();
        new SidecarOptions { Listen = IPAddress.Any, Cluster = "none", Tenants = tenants }.Validate();
    }

    [Fact]
    public void Timeouts_and_messages_round_trip_the_protocol_encodings()
    {
        Assert.Equal("200000u", GrpcProtocol.FormatTimeout(TimeSpan.FromMilliseconds(200)));
        Assert.True(GrpcProtocol.TryParseTimeout("5S", out var five) && five == TimeSpan.FromSeconds(5));
        Assert.True(GrpcProtocol.TryParseTimeout("1500m", out var ms) && ms == TimeSpan.FromMilliseconds(1500));
        Assert.False(GrpcProtocol.TryParseTimeout("123456789S", out _)); // more than 8 digits
        Assert.False(GrpcProtocol.TryParseTimeout("10x", out _));
        string text = "100% done: ünïcode\nline";
        Assert.Equal(text, GrpcProtocol.DecodeMessage(GrpcProtocol.EncodeMessage(text)));
        Assert.DoesNotContain('\n', GrpcProtocol.EncodeMessage(text));
        Assert.Equal(2L << 30, SidecarOptions.ParseBytes("2GiB"));
        Assert.Throws<ArgumentException>(() => SidecarOptions.ParseBytes("lots"));
    }

    [Fact]
    public void Metrics_render_counters_and_histograms_in_text_format()
    {
        var m = new MetricsRegistry();
        m.CreateCounter("c_total", "a counter", "k").Add(2, "v\"q");
        m.CreateHistogram("h_seconds", "a histogram", [0.1, 1], "k").Observe(0.5, "x");
        string text = m.Render();
        Assert.Contains("c_total{k=\"v\\\"q\"} 2", text, StringComparison.Ordinal);
        Assert.Contains("h_seconds_bucket{k=\"x\",le=\"0.1\"} 0", text, StringComparison.Ordinal);
        Assert.Contains("h_seconds_bucket{k=\"x\",le=\"1\"} 1", text, StringComparison.Ordinal);
        Assert.Contains("h_seconds_bucket{k=\"x\",le=\"+Inf\"} 1", text, StringComparison.Ordinal);
        Assert.Contains("h_seconds_count{k=\"x\"} 1", text, StringComparison.Ordinal);
    }
}
