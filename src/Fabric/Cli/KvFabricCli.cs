using System.CommandLine;

namespace KvFabric.Cli;

/// <summary>The `kvfabric` command line: parses options and composes library parts; no logic of its own.</summary>
public static class KvFabricCli
{
    public static async Task<int> RunAsync(string[] args)
    {
        var root = new RootCommand("KvFabric: KV-cache transfer and tiered storage fabric for disaggregated LLM inference.");
        return await root.Parse(args).InvokeAsync();
    }
}
