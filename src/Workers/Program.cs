return await KvFabric.Workers.WorkerCli.RunAsync(args);
