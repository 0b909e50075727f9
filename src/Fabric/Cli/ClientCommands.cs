using System.CommandLine;
using System.Security.Cryptography;
using System.Text;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Rpc.V1;

namespace KvFabric.Cli;

/// <summary>
/// `kvfabric client ...`: a sidecar's API from the shell, for operators and scripts (scripts/cluster.sh). Chains are
/// named: block i of chain NAME has the hash SHA-256("NAME/i")[..16] and bytes drawn from a seed, so a script can put a
/// chain on one node and check it anywhere else. Engines compute real chains with the hashing spec (docs/hashing.md).
/// </summary>
public static class ClientCommands
{
    public static Command Create()
    {
        var address = new Option<string>("--address") { Description = "the sidecar's gRPC address", DefaultValueFactory = _ => "http://127.0.0.1:50051" };
        var tenant = new Option<string>("--tenant") { Description = "tenant name", DefaultValueFactory = _ => "dev" };
        var token = new Option<string>("--token") { Description = "tenant token", DefaultValueFactory = _ => "dev" };
        var chain = new Option<string>("--chain") { Description = "the chain's name", Required = true };
        var blocks = new Option<int>("--blocks") { Description = "blocks in the chain", DefaultValueFactory = _ => 4 };
        var cmd = new Command("client", "Call a sidecar: put, lookup, match, route or fetch a named chain.");
        foreach (string verb in new[] { "put", "lookup", "match", "route", "fetch", "get" })
        {
            var sub = new Command(verb, Describe(verb)) { address, tenant, token, chain, blocks };
            sub.SetAction(async (p, ct) =>
            {
                using FabricClient client = FabricClient.Connect(p.GetValue(address)!, p.GetValue(tenant)!, p.GetValue(token)!);
                string name = p.GetValue(chain)!;
                int n = p.GetValue(blocks);
                if (n is < 1 or > 1024)
                {
                    await Console.Error.WriteLineAsync($"--blocks must be 1..1024; got {n}");
                    return 2;
                }

                byte[][] hashes = ChainOf(name, n);
                byte[] packed = HashChain.Pack(hashes.Select(h => (ReadOnlyMemory<byte>)h));
                var options = new CallOptions(Deadline: TimeSpan.FromSeconds(30), CancellationToken: ct);
                try
                {
                    Console.WriteLine(await RunAsync(verb, client, name, hashes, packed, options));
                    return 0;
                }
                catch (RpcException e)
                {
                    await Console.Error.WriteLineAsync($"kvfabric client {verb}: {e.Status}: {e.Detail}");
                    return 1;
                }
            });
            cmd.Subcommands.Add(sub);
        }

        return cmd;
    }

    private static string Describe(string verb) => verb switch
    {
        "put" => "store the chain's blocks (bytes drawn from the chain's name)",
        "lookup" => "the chain's longest prefix cached on this node",
        "match" => "per (node, worker) of the cluster: the chain's matched prefix by tier",
        "route" => "the worker the chain should go to, with every candidate's cost",
        "fetch" => "make the chain's longest prefix held anywhere in the cluster local",
        _ => "read the chain's blocks and check their bytes",
    };

    public static byte[][] ChainOf(string name, int n) =>
        Enumerable.Range(0, n).Select(i => SHA256.HashData(Encoding.UTF8.GetBytes($"{name}/{i}"))[..16]).ToArray();

    private static byte[] BytesOf(string name, int i, int length)
    {
        var bytes = new byte[length];
        new Random(BitConverter.ToInt32(SHA256.HashData(Encoding.UTF8.GetBytes($"bytes:{name}/{i}")))).NextBytes(bytes);
        return bytes;
    }

    private static async Task<string> RunAsync(string verb, FabricClient client, string name, byte[][] hashes, byte[] packed, CallOptions options)
    {
        switch (verb)
        {
            case "put":
            {
                int blockBytes = (int)(await client.StatsAsync(options)).Layout.BlockBytes;
                PutResponse r = await client.PutAsync(hashes.Select((h, i) =>
                    new BlockToPut(h, i == 0 ? ReadOnlyMemory<byte>.Empty : hashes[i - 1], (uint)i, BytesOf(name, i, blockBytes))), options);
                return $"put {name}: {r}";
            }
            case "lookup":
                return $"lookup {name}: {await client.LookupAsync(packed, options)}";
            case "match":
            {
                MatchResponse r = await client.MatchAsync(packed, options);
                return r.Matches.Count == 0 ? $"match {name}: no worker holds any of it"
                    : string.Join('\n', r.Matches.Select(m => $"match {name}: {m.Node}/{m.Worker} {m.MatchedBlocks} blocks (gpu {m.GpuBlocks}, host {m.HostBlocks}, ssd {m.SsdBlocks})"));
            }
            case "route":
            {
                RouteResponse r = await client.RouteAsync(packed, options: options);
                return $"route {name}: {r.Node}/{r.Worker}, expected hit {r.ExpectedHitBlocks} blocks, cost {r.Cost:F2}; candidates: "
                    + string.Join(", ", r.Candidates.Select(c => $"{c.Node} {c.Cost:F2}"));
            }
            case "fetch":
            {
                FetchResponse r = await client.FetchAsync(packed, options);
                return $"fetch {name}: {r.LocalBlocks} blocks were local, {r.FetchedBlocks} fetched"
                    + (r.FetchedBlocks > 0 ? $" from {r.SourceNode} over {r.Backend} ({r.FetchedBytes} bytes)" : string.Empty);
            }
            default:
            {
                int blockBytes = (int)(await client.StatsAsync(options)).Layout.BlockBytes;
                var into = new byte[hashes.Length * blockBytes];
                await client.GetAsync(packed, into, blockBytes, options: options);
                for (int i = 0; i < hashes.Length; i++)
                {
                    if (!into.AsSpan(i * blockBytes, blockBytes).SequenceEqual(BytesOf(name, i, blockBytes)))
                        throw new RpcException(StatusCode.DataLoss, $"block {i} of {name} does not hold the bytes put there");
                }

                return $"get {name}: {hashes.Length} blocks, every byte as put";
            }
        }
    }
}
