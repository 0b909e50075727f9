using System.Net;
using KvFabric.Rpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Configuration;
using Xunit;

namespace KvFabric.Tests.Sidecar;

/// <summary>Invalid configuration fails while the options are read and checked, with a message that names the option.</summary>
public sealed class SidecarOptionsTests
{
    private static SidecarOptions Read(params (string Key, string Value)[] values) =>
        SidecarOptions.From(new ConfigurationBuilder().AddInMemoryCollection(values.Select(v => KeyValuePair.Create(v.Key, (string?)v.Value))).Build());

    private static readonly TenantConfig[] OneTenant = [new("team-a", "token-a")];

    [Theory]
    [InlineData("dev", "1")]
    [InlineData("dev", "yes")]
    [InlineData("lock_in_ram", "yes")]
    [InlineData("write_through", "on")]
    [InlineData("ssd_verify_on_open", "1")]
    [InlineData("reflection", "no")]
    [InlineData("tenants:0:admin", "yes")]
    public void A_boolean_that_is_not_true_or_false_is_refused_not_read_as_false(string key, string value)
    {
        var e = Assert.Throws<ArgumentException>(() => Read(("tenants:0:name", "a"), ("tenants:0:token", "t"), (key, value)));
        Assert.Contains(key, e.Message, StringComparison.Ordinal);
        Assert.Contains("true or false", e.Message, StringComparison.Ordinal);
        Assert.True(Read(("dev", "True")).Dev);
        Assert.False(Read(("dev", "false")).Dev);
        Assert.True(Read().Reflection); // on unless the configuration says false
        Assert.False(Read(("reflection", "false")).Reflection);
    }

    [Fact]
    public void An_unknown_log_format_is_refused()
    {
        var e = Assert.Throws<ArgumentException>(() => Read(("log_format", "jsonl")));
        Assert.Contains("log_format", e.Message, StringComparison.Ordinal);
        Assert.True(Read(("log_format", "JSON")).JsonLogs);
        Assert.False(Read(("log_format", "text")).JsonLogs);
    }

    [Theory]
    [InlineData("host_capacity", "-1GiB")]
    [InlineData("gpu_capacity", "lots")]
    [InlineData("ssd_capacity", "-5")]
    [InlineData("max_send_message", "big")]
    public void A_bad_byte_size_names_its_option(string key, string value)
    {
        var e = Assert.Throws<ArgumentException>(() => Read((key, value)));
        Assert.Contains(key, e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("keepalive_s", "1e300")]
    [InlineData("keepalive_s", "Infinity")]
    [InlineData("cluster_lease_ttl_s", "1e20")]
    [InlineData("recompute_ms_per_block", "Infinity")]
    public void A_duration_too_long_for_a_clock_is_an_argument_error_naming_the_option(string key, string value)
    {
        // Was an OverflowException from TimeSpan.FromSeconds: a stack trace instead of a message.
        var e = Assert.Throws<ArgumentException>(() => Read((key, value)));
        Assert.Contains(key, e.Message, StringComparison.Ordinal);
    }

    [Theory]
    [InlineData(-1)]
    [InlineData(65536)]
    public void A_transfer_port_out_of_range_is_refused_by_validation(int port)
    {
        // Was an ArgumentOutOfRangeException ("Parameter 'port'") from the transfer agent's constructor.
        var e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = OneTenant, TransferPort = port }.Validate());
        Assert.Contains("transfer", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void The_stream_stall_timeout_is_read_and_checked()
    {
        Assert.Equal(TimeSpan.FromSeconds(60), Read().StreamStallTimeout);
        Assert.Equal(TimeSpan.FromSeconds(5), Read(("stream_stall_timeout_s", "5")).StreamStallTimeout);
        var e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = OneTenant, StreamStallTimeout = TimeSpan.Zero }.Validate());
        Assert.Contains("stream_stall_timeout_s", e.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void A_negative_gpu_device_is_refused_by_validation() =>
        Assert.Contains("gpu_device", Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = OneTenant, GpuDevice = -1 }.Validate()).Message,
            StringComparison.Ordinal);

    [Fact]
    public void Tenants_that_clash_fail_validation_not_start()
    {
        // Were refused only in StartAsync, after the tiers were opened, and printed with a stack trace.
        var e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Dev = true, Tenants = [new("dev", "other")] }.Validate());
        Assert.Contains("--dev", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => new SidecarOptions { Dev = true, Tenants = [new("mine", "dev")] }.Validate());
        e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = [new("a", "same"), new("b", "same")] }.Validate());
        Assert.Contains("token", e.Message, StringComparison.Ordinal);
        Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = [new("a", "t1"), new("a", "t2")] }.Validate());
    }

    [Fact]
    public void An_unreadable_tls_certificate_fails_validation_naming_the_option()
    {
        string dir = Directory.CreateTempSubdirectory("kvfabric-badtls-").FullName;
        try
        {
            var missing = new SidecarOptions { Tenants = OneTenant, TlsCertificate = Path.Combine(dir, "none.crt"), TlsKey = Path.Combine(dir, "none.key") };
            var e = Assert.Throws<ArgumentException>(() => missing.Validate());
            Assert.Contains("tls:certificate", e.Message, StringComparison.Ordinal);
            File.WriteAllText(Path.Combine(dir, "garbage.crt"), "not a certificate");
            File.WriteAllText(Path.Combine(dir, "garbage.key"), "not a key");
            var garbage = missing with { TlsCertificate = Path.Combine(dir, "garbage.crt"), TlsKey = Path.Combine(dir, "garbage.key") };
            Assert.Contains("--tls-cert", Assert.Throws<ArgumentException>(() => garbage.Validate()).Message, StringComparison.Ordinal);
        }
        finally
        {
            Directory.Delete(dir, recursive: true);
        }
    }

    [Fact]
    public void Dev_mode_accepts_only_loopback_addresses()
    {
        foreach (string address in new[] { "0.0.0.0", "::", "10.0.0.5", "::ffff:10.0.0.5", "::ffff:0.0.0.0" })
            Assert.Throws<ArgumentException>(() => new SidecarOptions { Dev = true, Listen = IPAddress.Parse(address) }.Validate());
        foreach (string address in new[] { "127.0.0.1", "::1" })
            new SidecarOptions { Dev = true, Listen = IPAddress.Parse(address) }.Validate();
        Assert.Throws<ArgumentException>(() => Read(("dev", "true"), ("listen", "localhost"))); // a name is not an address
    }

    [Fact]
    public void An_unknown_policy_names_the_option_it_came_from()
    {
        Assert.StartsWith("ssd_policy", Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = OneTenant, SsdPolicy = "lfu" }.Validate()).Message,
            StringComparison.Ordinal);
        Assert.StartsWith("policy", Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = OneTenant, Policy = "lfu" }.Validate()).Message,
            StringComparison.Ordinal);
    }

    [Theory]
    [InlineData("ftp://10.0.0.5:50051")]
    [InlineData("http://")]
    [InlineData("10.0.0.5 50051")]
    public void An_advertise_address_other_nodes_would_ignore_fails_at_start(string advertise)
    {
        // The node started, and only the other nodes logged that they ignore it (no events, routing or fetch).
        var admin = new TenantConfig("ops", "ops-token", Admin: true);
        var e = Assert.Throws<ArgumentException>(() => new SidecarOptions { Tenants = [admin], Cluster = "inproc", Advertise = advertise }.Validate());
        Assert.Contains("advertise", e.Message, StringComparison.Ordinal);
        new SidecarOptions { Tenants = [admin], Cluster = "inproc", Advertise = "10.0.0.5:50051" }.Validate();
        new SidecarOptions { Tenants = [admin], Cluster = "inproc", Advertise = "https://node-a.example:50051" }.Validate();
    }
}
