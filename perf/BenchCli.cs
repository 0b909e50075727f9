using System.CommandLine;

namespace KvFabric.Bench;

/// <summary>kvfabric-bench: parses options and runs one suite; the measuring lives in the suite classes.</summary>
public static class BenchCli
{
    public static async Task<int> RunAsync(string[] args)
    {
        var root = new RootCommand("kvfabric-bench: KvFabric's throughput perf suite; every figure next to a reference measured in the same run.")
        {
            Transfer.TransferCommand.Create(),
            Rpc.RpcCommand.Create(),
            Tiers.TiersMetaCommand.Create(),
            Index.IndexCommand.Create(),
            Replay.ReplayCommand.Create(),
            Cluster.ClusterCommand.Create(),
            Route.RouteCommand.Create(),
            Tiers.TiersCommand.Create(),
            Compare.CompareCommand.Create(),
            Micro.MicroCommand.Create(),
            Report.ReportCommand.Create(),
            E2e.E2eCommand.Create(),
            References.RawSocketReference.SinkCommand(),
        };
        return await root.Parse(args).InvokeAsync();
    }
}
