using KvFabric.Sidecar;
using Xunit;

namespace KvFabric.Tests.Workers;

/// <summary>
/// `kvfabric-worker serve` stops cleanly on SIGTERM, also one that arrives right after READY. (That a stop may take
/// longer than System.CommandLine's old 2 s cut-off is shown by WorkerDrainTests, whose worker drains a stream for longer.)
/// </summary>
[Collection("multi-process")]
public sealed class WorkerSignalTests
{
    [Fact]
    public async Task Sigterm_right_after_ready_stops_the_worker_cleanly()
    {
        // The worker's own handler is in place from before it starts (the web host's console lifetime would swallow a
        // signal that reached only it).
        for (int round = 0; round < 5; round++)
        {
            await using var worker = await ServiceProcess.StartAsync("kvfabric-worker.dll", "serve",
                ["--role", "decode", "--name", $"sigterm-{round}", "--port", "0", "--model", "tiny", "--kv-blocks", "64", "--handoff-slots", "16"]);
            int code = await worker.StopAsync(TimeSpan.FromSeconds(30));
            Assert.True(code == 0, $"round {round}: exit code {code} (137: it ignored SIGTERM and was killed; 143: cut off mid-stop); log:\n{worker.Log}");
        }
    }
}
