using System.CommandLine;
using System.Net;
using KvFabric.Memory;
using KvFabric.Tiers.Ssd;
using KvFabric.Transfer.Diagnostics;

namespace KvFabric.Cli;

/// <summary>The `kvfabric` command line: parses options and composes library parts; no logic of its own.</summary>
public static class KvFabricCli
{
    public static async Task<int> RunAsync(string[] args)
    {
        var root = new RootCommand("KvFabric: KV-cache transfer and tiered storage fabric for disaggregated LLM inference.");
        root.Subcommands.Add(PeerCommand());
        root.Subcommands.Add(ShmCleanCommand());
        root.Subcommands.Add(SsdWriterCommand());
        return await root.Parse(args).InvokeAsync();
    }

    private static Command PeerCommand()
    {
        var name = new Option<string>("--name") { Description = "agent name", DefaultValueFactory = _ => "peer" };
        var regionMib = new Option<long>("--region-mib") { Description = "size of the registered region in MiB", DefaultValueFactory = _ => 64 };
        var shm = new Option<bool>("--shm") { Description = "place the region in a /dev/shm segment (reachable by the shared-memory backend)" };
        var listen = new Option<string>("--listen") { Description = "address the TCP backend binds", DefaultValueFactory = _ => "127.0.0.1" };
        var port = new Option<int>("--port") { Description = "TCP port (0: any free port)" };
        var corrupt = new Option<int>("--corrupt-nth-payload") { Description = "fault injection: corrupt one byte of the Nth payload sent (tests only)" };
        var cmd = new Command("peer", "Run a standalone transfer agent with one region, driven by a line protocol on stdin (see docs/transfer.md).")
        {
            name, regionMib, shm, listen, port, corrupt,
        };
        cmd.SetAction(async (parse, ct) =>
        {
            long mib = parse.GetValue(regionMib);
            if (mib <= 0)
                throw new ArgumentOutOfRangeException(nameof(regionMib), mib, "--region-mib must be positive");
            await using var peer = new TransferPeer(new TransferPeerOptions
            {
                Name = parse.GetValue(name)!,
                RegionBytes = mib << 20,
                Shared = parse.GetValue(shm),
                Listen = IPAddress.Parse(parse.GetValue(listen)!),
                Port = parse.GetValue(port),
                CorruptNthPayload = parse.GetValue(corrupt),
            });
            return await peer.RunAsync(Console.In, Console.Out);
        });
        return cmd;
    }

    private static Command ShmCleanCommand()
    {
        var cmd = new Command("shm-clean", "Remove KvFabric shared-memory segments whose owning process is gone.");
        cmd.SetAction(_ =>
        {
            Console.WriteLine($"removed {SharedMemorySegment.RemoveStale()} stale segment(s) from {SharedMemorySegment.Directory}");
            return 0;
        });
        return cmd;
    }

    // Hidden: the child process of the SSD crash tests (tests/KvFabric.Tests/Tiers/SsdCrashTests.cs).
    private static Command SsdWriterCommand()
    {
        var dir = new Option<string>("--dir") { Description = "the SSD tier's directory", Required = true };
        var first = new Option<int>("--first") { Description = "number of the first block written" };
        var blocks = new Option<int>("--blocks") { Description = "blocks to write", DefaultValueFactory = _ => 1000 };
        var blockBytes = new Option<int>("--block-bytes") { Description = "bytes per block", DefaultValueFactory = _ => 64 << 10 };
        var capacityMib = new Option<long>("--capacity-mib") { Description = "tier capacity in MiB", DefaultValueFactory = _ => 1024 };
        var concurrency = new Option<int>("--concurrency") { Description = "concurrent writers (group commit)", DefaultValueFactory = _ => 4 };
        var cmd = new Command("ssd-writer", "Write numbered pattern blocks to an SSD tier, printing DURABLE i per acknowledged block (crash tests).")
        {
            dir, first, blocks, blockBytes, capacityMib, concurrency,
        };
        cmd.Hidden = true;
        cmd.SetAction((parse, ct) =>
        {
            var options = SsdWriterTool.Options(parse.GetValue(dir)!, parse.GetValue(blockBytes), parse.GetValue(capacityMib) << 20);
            return SsdWriterTool.RunAsync(options, parse.GetValue(first), parse.GetValue(blocks), parse.GetValue(concurrency), Console.Out, ct);
        });
        return cmd;
    }
}
