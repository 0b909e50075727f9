using KvFabric.Blocks;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>A sidecar on loopback with small blocks and two tenants (plus dev), for the tests of one class.</summary>
public sealed class SidecarFixture : IAsyncLifetime
{
    public static readonly KvLayout SmallLayout = new("test-model", 2, 2, 16, KvDType.F16, 16); // 4 KiB blocks
    public const int Capacity = 64;

    public SidecarHost Host { get; private set; } = null!;
    public string Address => $"http://{Host.GrpcEndpoint}";
    public int BlockBytes => (int)SmallLayout.BlockBytes;

    public async Task InitializeAsync()
    {
        Host = new SidecarHost(new SidecarOptions
        {
            Node = "node-a",
            Port = 0,
            MetricsPort = 0,
            Dev = true,
            Tenants = [new TenantConfig("alpha", "alpha-token"), new TenantConfig("beta", "beta-token")],
            Layout = SmallLayout,
            HostCapacityBytes = Capacity * SmallLayout.BlockBytes,
            StagingSlots = 8,
            MaxReceiveMessageBytes = 256 * 1024,
        }, NullLoggerFactory.Instance);
        await Host.StartAsync();
    }

    public FabricClient Client(string tenant = "alpha", string? token = null, TimeSpan? deadline = null) =>
        new(new RpcChannelOptions
        {
            Address = new Uri(Address),
            Tenant = tenant,
            Token = token ?? tenant + "-token",
            DefaultDeadline = deadline ?? TimeSpan.FromSeconds(20),
        });

    public async Task DisposeAsync() => await Host.DisposeAsync();
}

/// <summary>Deterministic chains and block bytes for the RPC tests.</summary>
public static class TestBlocks
{
    /// <summary>Environment for a `kvfabric serve` process with SidecarFixture's 4 KiB-block layout.</summary>
    public static Dictionary<string, string> SmallLayoutEnv(string model, string hostCapacity = "1MiB") => new()
    {
        ["KVFABRIC_LAYOUT__MODEL"] = model,
        ["KVFABRIC_LAYOUT__LAYERS"] = "2",
        ["KVFABRIC_LAYOUT__KV_HEADS"] = "2",
        ["KVFABRIC_LAYOUT__HEAD_DIM"] = "16",
        ["KVFABRIC_LAYOUT__DTYPE"] = "fp16",
        ["KVFABRIC_LAYOUT__TOKENS_PER_BLOCK"] = "16",
        ["KVFABRIC_HOST_CAPACITY"] = hostCapacity,
    };

    public static byte[][] Chain(string seed, int n)
    {
        var hashes = new byte[n][];
        for (int i = 0; i < n; i++)
            hashes[i] = System.Security.Cryptography.SHA256.HashData(System.Text.Encoding.UTF8.GetBytes($"{seed}/{i}"))[..16];
        return hashes;
    }

    public static byte[] Bytes(int length, int seed)
    {
        var bytes = new byte[length];
        new Random(seed).NextBytes(bytes);
        return bytes;
    }

    public static IEnumerable<BlockToPut> ToPut(byte[][] chain, int blockBytes, int seed) =>
        chain.Select((h, i) => new BlockToPut(h, i == 0 ? ReadOnlyMemory<byte>.Empty : chain[i - 1], (uint)i, Bytes(blockBytes, seed + i)));

    public static byte[] Packed(byte[][] chain) => HashChain.Pack(chain.Select(h => (ReadOnlyMemory<byte>)h));
}
