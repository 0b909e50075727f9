using System.CommandLine;
using BenchmarkDotNet.Configs;
using BenchmarkDotNet.Diagnosers;
using BenchmarkDotNet.Exporters;
using BenchmarkDotNet.Filters;
using BenchmarkDotNet.Jobs;
using BenchmarkDotNet.Loggers;
using BenchmarkDotNet.Running;
using BenchmarkDotNet.Toolchains.InProcess.Emit;

namespace KvFabric.Bench.Micro;

/// <summary>
/// `kvfabric-bench micro`: BenchmarkDotNet micro-benchmarks of the hot paths, in process (this executable is built with
/// tiered compilation off, so the code measured is the optimized code), a short job, with the memory diagnoser: the
/// "Allocated" column is bytes allocated per operation, which must be 0 on a hot path.
/// </summary>
public static class MicroCommand
{
    public static readonly Type[] Benchmarks = [typeof(BlockHashing), typeof(GrpcFramingRoundTrip), typeof(HostBlockPoolRentReturn), typeof(RadixTreeApplyMatch)];

    public static Command Create()
    {
        var filter = new Option<string[]>("--filter") { Description = "glob(s) over Type.Method, e.g. *RadixTree*; default all", AllowMultipleArgumentsPerToken = true };
        var artifacts = new Option<string>("--artifacts") { Description = "BenchmarkDotNet's output directory (the Markdown table lands in results/)", DefaultValueFactory = _ => Path.Combine(Path.GetTempPath(), "kvfabric-bench-micro") };
        var iterations = new Option<int>("--iterations") { Description = "measured iterations per benchmark", DefaultValueFactory = _ => 5 };
        var cmd = new Command("micro", "BenchmarkDotNet micro-benchmarks of hot paths with allocations per operation.") { filter, artifacts, iterations };
        cmd.SetAction(p =>
        {
            var job = Job.ShortRun.WithToolchain(InProcessEmitToolchain.Instance).WithLaunchCount(1).WithWarmupCount(2)
                .WithIterationCount(p.GetValue(iterations)).WithId("short-inprocess");
            var config = ManualConfig.CreateEmpty()
                .AddJob(job)
                .AddDiagnoser(MemoryDiagnoser.Default)
                .AddColumnProvider(BenchmarkDotNet.Columns.DefaultColumnProviders.Instance)
                .AddLogger(ConsoleLogger.Default)
                .AddExporter(MarkdownExporter.GitHub)
                .WithArtifactsPath(Path.GetFullPath(p.GetValue(artifacts)!))
                .WithOptions(ConfigOptions.DisableOptimizationsValidator);
            string[] globs = p.GetValue(filter) ?? [];
            if (globs.Length > 0)
                config = config.AddFilter(new GlobFilter(globs));
            var summaries = BenchmarkRunner.Run(Benchmarks, config);
            return summaries.Any(s => s.HasCriticalValidationErrors || s.Reports.Any(r => !r.Success)) ? 1 : 0;
        });
        return cmd;
    }
}
