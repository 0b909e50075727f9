using System.Runtime.CompilerServices;

namespace KvFabric.Tests;

internal static class TestProcessSetup
{
    // The test process runs many stores, servers and peers side by side on 2 cores, some of them in calls that block a
    // pool thread for milliseconds (FASTER's commit and scan paths, fsync). The pool starts with one thread per core and
    // adds more about twice a second, so a timer or continuation of a timing-sensitive test could wait seconds behind
    // them (an in-process lease expired 6-10 s after its 2 s TTL in about one full run in three). Sixteen threads ready
    // from the start take that queueing out of the tests' timings; production processes keep .NET's defaults.
    [ModuleInitializer]
    internal static void RaiseThreadPoolMinimum()
    {
        ThreadPool.GetMinThreads(out int workers, out int io);
        ThreadPool.SetMinThreads(Math.Max(workers, 16), Math.Max(io, 16));
    }
}
