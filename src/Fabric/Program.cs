return await KvFabric.Cli.KvFabricCli.RunAsync(args);
