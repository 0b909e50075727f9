using System.CommandLine;

namespace KvFabric.Bench;

public static class BenchCli
{
    public static async Task<int> RunAsync(string[] args)
    {
        var root = new RootCommand("kvfabric-bench: KvFabric's throughput perf suite.");
        return await root.Parse(args).InvokeAsync();
    }
}
