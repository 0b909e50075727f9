using System.CommandLine;
using System.Diagnostics;
using System.Security.Cryptography;
using System.Text;
using KvFabric.Bench.References;
using KvFabric.Bench.Reporting;
using KvFabric.Client;
using KvFabric.Client.Grpc;
using KvFabric.Cluster;
using KvFabric.Rpc.V1;
using KvFabric.Sidecar;

namespace KvFabric.Bench.Cluster;

// `kvfabric-bench cluster`: a real etcd and N sidecar processes on loopback. How stale a node's copy of the cluster
// index is (a Put on the first node until the last node's Match shows it), how fast Fetch pulls a chain across nodes
// through the transfer layer (against memcpy of the same bytes, measured in the same run: both nodes share this host, so
// the transfer layer's shared-memory backend is what moves them), and Route latency with every node a candidate.
public static class ClusterCommand
{
    public static Command Create()
    {
        var nodes = new Option<int>("--nodes") { Description = "sidecar processes", DefaultValueFactory = _ => 3 };
        var blocks = new Option<int>("--blocks") { Description = "blocks (2 MiB, the default layout) per fetched chain", DefaultValueFactory = _ => 64 };
        var events = new Option<int>("--events") { Description = "puts timed until they show in another node's index", DefaultValueFactory = _ => 50 };
        var runs = new Option<int>("--runs") { Description = "fetches timed (the median is reported)", DefaultValueFactory = _ => 5 };
        var routes = new Option<int>("--routes") { Description = "Route calls timed", DefaultValueFactory = _ => 1000 };
        var quick = new Option<bool>("--quick") { Description = "CI-sized: 8-block chains, 10 events, 3 runs, 100 routes" };
        var json = new Option<string?>("--json") { Description = "write the result as JSON to this file" };
        var cmd = new Command("cluster", "etcd + N sidecars: index propagation delay, cross-node Fetch GB/s against memcpy, Route latency.")
        {
            nodes, blocks, events, runs, routes, quick, json,
        };
        cmd.SetAction(async (p, ct) =>
        {
            bool q = p.GetValue(quick);
            var result = await RunAsync(p.GetValue(nodes), QuickDefaults.Pick(p, blocks, q, 8), QuickDefaults.Pick(p, events, q, 10),
                QuickDefaults.Pick(p, runs, q, 3), QuickDefaults.Pick(p, routes, q, 100), ct);
            JsonReport.Write(p.GetValue(json), result);
            return 0;
        });
        return cmd;
    }

    private static byte[][] Chain(string name, int n) =>
        Enumerable.Range(0, n).Select(i => SHA256.HashData(Encoding.UTF8.GetBytes($"{name}/{i}"))[..16]).ToArray();

    private static byte[] Packed(byte[][] chain) => HashChain.Pack(chain.Select(h => (ReadOnlyMemory<byte>)h));

    private static async Task<System.Text.Json.Nodes.JsonObject> RunAsync(int nodeCount, int blocks, int events, int runs, int routes, CancellationToken ct)
    {
        if (nodeCount < 2 || blocks < 1 || events < 1 || runs < 1 || routes < 1)
            throw new ArgumentException("--nodes >= 2 and positive --blocks, --events, --runs, --routes");
        await using EtcdProcess etcd = await EtcdProcess.StartAsync();
        string cluster = "bench-" + Guid.NewGuid().ToString("N")[..8];
        long blockBytes = SidecarOptions.DefaultLayout.BlockBytes;
        var env = new Dictionary<string, string>
        {
            ["KVFABRIC_CLUSTER_NAME"] = cluster,
            ["KVFABRIC_HOST_CAPACITY"] = ((blocks * 2 + events + 16) * blockBytes).ToString(System.Globalization.CultureInfo.InvariantCulture),
        };
        var sidecars = new List<ServiceProcess>();
        var clients = new List<FabricClient>();
        try
        {
            for (int i = 0; i < nodeCount; i++)
            {
                sidecars.Add(await ServiceProcess.StartAsync(["--dev", "--port", "0", "--metrics-port", "-1", "--node", $"bench-node-{i}",
                    "--worker", $"worker-{i}", "--cluster", "etcd", "--etcd", etcd.ClientUrl.ToString()], env));
                clients.Add(FabricClient.Connect(sidecars[i].GrpcAddress, "dev", "dev"));
            }

            FabricClient first = clients[0], last = clients[^1];
            var options = new CallOptions(Deadline: TimeSpan.FromSeconds(60), CancellationToken: ct);
            // Every node must see every other before anything is timed.
            foreach (FabricClient c in clients)
                await UntilAsync(async () => (await c.RouteAsync(Packed(Chain("warm", 1)), options: options)).Candidates.Count == nodeCount, "every node a member", ct);

            // Propagation: from the end of a Put on the first node to the last node's Match showing it.
            var delays = new List<double>();
            var bytes = new byte[blockBytes];
            for (int e = 0; e < events; e++)
            {
                byte[][] one = Chain($"{cluster}-event-{e}", 1);
                await first.PutAsync([new BlockToPut(one[0], ReadOnlyMemory<byte>.Empty, 0, bytes)], options);
                var clock = Stopwatch.StartNew();
                while ((await last.MatchAsync(Packed(one), options)).Matches.Count == 0)
                {
                    if (clock.Elapsed > TimeSpan.FromSeconds(30))
                        throw new TimeoutException($"a block put on the first node did not reach the last node's index in 30 s");
                }

                delays.Add(clock.Elapsed.TotalMilliseconds);
            }

            // Fetch: the last node pulls a chain the first holds, then deletes its copy for the next run.
            byte[][] chain = Chain($"{cluster}-fetch", blocks);
            new Random(5).NextBytes(bytes);
            await first.PutAsync(chain.Select((h, i) => new BlockToPut(h, i == 0 ? ReadOnlyMemory<byte>.Empty : chain[i - 1], (uint)i, bytes)), options);
            await UntilAsync(async () => (await last.MatchAsync(Packed(chain), options)).Matches.Any(m => m.MatchedBlocks == blocks), "the chain in the last node's index", ct);
            var fetchGbps = new List<double>();
            string backend = "";
            for (int r = 0; r <= runs; r++)
            {
                var clock = Stopwatch.StartNew();
                FetchResponse f = await last.FetchAsync(Packed(chain), options);
                double seconds = clock.Elapsed.TotalSeconds;
                if (f.FetchedBlocks != blocks)
                    throw new InvalidOperationException($"fetch moved {f.FetchedBlocks} of {blocks} blocks: {f}");
                backend = f.Backend;
                if (r > 0) // the first fetch is the warm-up (connections, mappings)
                    fetchGbps.Add(f.FetchedBytes / seconds / 1e9);
                await last.DeleteAsync(Packed(chain), options);
                await UntilAsync(async () => (await last.LookupAsync(Packed(chain), options)).MatchedBlocks == 0, "the fetched copy deleted", ct);
            }

            IReadOnlyList<double> memcpy = MemcpyReference.Measure(blockBytes, blocks, runs, 1, sharedDestination: true);

            // Route with every node a candidate, the chain held by the first.
            var routeUs = new double[routes];
            for (int i = 0; i < routes; i++)
            {
                var clock = Stopwatch.StartNew();
                await clients[1].RouteAsync(Packed(chain), options: options);
                routeUs[i] = clock.Elapsed.TotalMicroseconds;
            }

            Array.Sort(routeUs);
            double[] delaySorted = [.. delays.Order()];
            Spread fetch = Spread.Of(fetchGbps), copy = Spread.Of(memcpy);
            Console.WriteLine($"index propagation (put on node 0 -> Match on node {nodeCount - 1}): p50 {Spread.Percentile(delaySorted, 50):F2} ms, p99 {Spread.Percentile(delaySorted, 99):F2} ms over {events}");
            Console.WriteLine($"fetch of {blocks} x {Sizes.Format(blockBytes)} across nodes over {backend}: {fetch.Median:F2} GB/s ({fetch.Min:F2}-{fetch.Max:F2}); memcpy {copy.Median:F2} GB/s; ratio {fetch.Median / copy.Median:P0}");
            Console.WriteLine($"route with {nodeCount} candidates: p50 {Spread.Percentile(routeUs, 50):F0} us, p99 {Spread.Percentile(routeUs, 99):F0} us");
            var report = JsonReport.Header("cluster");
            report["nodes"] = nodeCount;
            report["blocks"] = blocks;
            report["block_bytes"] = blockBytes;
            report["propagation_p50_ms"] = JsonReport.Round(Spread.Percentile(delaySorted, 50));
            report["propagation_p99_ms"] = JsonReport.Round(Spread.Percentile(delaySorted, 99));
            report["fetch_gbps"] = JsonReport.Of(fetch);
            report["fetch_backend"] = backend;
            report["memcpy_gbps"] = JsonReport.Of(copy);
            report["ratios"] = new System.Text.Json.Nodes.JsonObject { ["fetch_vs_memcpy"] = JsonReport.Round(fetch.Median / copy.Median) };
            report["route_p50_us"] = JsonReport.Round(Spread.Percentile(routeUs, 50));
            report["route_p99_us"] = JsonReport.Round(Spread.Percentile(routeUs, 99));
            return report;
        }
        finally
        {
            foreach (FabricClient c in clients)
                c.Dispose();
            foreach (ServiceProcess s in sidecars)
                await s.DisposeAsync();
        }
    }

    private static async Task UntilAsync(Func<Task<bool>> done, string what, CancellationToken ct)
    {
        var clock = Stopwatch.StartNew();
        while (!await done())
        {
            if (clock.Elapsed > TimeSpan.FromSeconds(60))
                throw new TimeoutException($"{what}: not reached in 60 s");
            await Task.Delay(10, ct);
        }
    }
}
