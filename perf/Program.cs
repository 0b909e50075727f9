return await KvFabric.Bench.BenchCli.RunAsync(args);
