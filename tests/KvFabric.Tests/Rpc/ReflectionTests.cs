using Google.Protobuf;
using Google.Protobuf.Reflection;
using Grpc.Reflection.V1;
using KvFabric.Client.Grpc;
using KvFabric.Sidecar;
using Microsoft.Extensions.Logging.Abstractions;
using Xunit;

namespace KvFabric.Tests.Rpc;

/// <summary>grpc.reflection on a real sidecar: what grpcurl asks, answered so that a client can rebuild the schema.</summary>
public sealed class ReflectionTests
{
    private const string V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
    private const string V1Alpha = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

    private static SidecarHost Host(bool reflection = true) => new(new SidecarOptions
    {
        Port = 0, MetricsPort = -1, Dev = true, Layout = SidecarFixture.SmallLayout, HostCapacityBytes = 1 << 20, StagingSlots = 1,
        Reflection = reflection,
    }, NullLoggerFactory.Instance);

    // No tenant and no token: reflection, like health, answers anyone.
    private static async Task<List<ServerReflectionResponse>> AskAsync(SidecarHost host, string path, params ServerReflectionRequest[] requests) =>
        await AskAsync(host.GrpcEndpoint!, path, requests);

    private static async Task<List<ServerReflectionResponse>> AskAsync(System.Net.IPEndPoint server, string path, params ServerReflectionRequest[] requests)
    {
        using var channel = new RpcChannel(new RpcChannelOptions { Address = new Uri($"http://{server}") });
        await using var call = channel.Streaming<ServerReflectionRequest, ServerReflectionResponse>(path, ServerReflectionResponse.Parser,
            new CallOptions(Deadline: TimeSpan.FromSeconds(30)));
        var answers = new List<ServerReflectionResponse>();
        foreach (ServerReflectionRequest r in requests)
        {
            await call.WriteAsync(r);
            answers.Add(await call.ReadAsync() ?? throw new InvalidOperationException("the stream ended before the answer"));
        }

        await call.CompleteAsync();
        Assert.Null(await call.ReadAsync());
        return answers;
    }

    [Fact]
    public async Task Lists_every_served_service_and_hands_out_a_schema_a_client_can_build()
    {
        await using var host = Host();
        await host.StartAsync();
        var answers = await AskAsync(host, V1,
            new ServerReflectionRequest { ListServices = "*" },
            new ServerReflectionRequest { FileContainingSymbol = "kvfabric.v1.Fabric.Lookup" },
            new ServerReflectionRequest { FileContainingSymbol = ".kvfabric.v1.LookupResponse" },
            new ServerReflectionRequest { FileContainingSymbol = "kvfabric.v1.TIER_HOST" });

        Assert.Equal(
            ["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection",
             "kvfabric.v1.Fabric", "kvfabric.v1.Index", "kvfabric.v1.Transfer"],
            answers[0].ListServicesResponse.Service.Select(s => s.Name));

        // The file that defines the method, then what it imports: enough to rebuild the descriptors with no .proto.
        var files = answers[1].FileDescriptorResponse.FileDescriptorProto;
        Assert.Equal(["kvfabric/v1/fabric.proto", "kvfabric/v1/common.proto"], files.Select(b => FileDescriptorProto.Parser.ParseFrom(b).Name));
        IReadOnlyList<FileDescriptor> built = FileDescriptor.BuildFromByteStrings(files.Reverse());
        MethodDescriptor lookup = built.Single(f => f.Name == "kvfabric/v1/fabric.proto").FindTypeByName<ServiceDescriptor>("Fabric").FindMethodByName("Lookup");
        Assert.Equal("kvfabric.v1.LookupRequest", lookup.InputType.FullName);
        Assert.Equal("kvfabric.v1.LookupResponse", lookup.OutputType.FullName);
        Assert.Equal("kvfabric/v1/fabric.proto", FileDescriptorProto.Parser.ParseFrom(answers[2].FileDescriptorResponse.FileDescriptorProto[0]).Name);
        Assert.Equal("kvfabric/v1/common.proto", FileDescriptorProto.Parser.ParseFrom(answers[3].FileDescriptorResponse.FileDescriptorProto[0]).Name);
        Assert.Equal("kvfabric.v1.Fabric.Lookup", answers[1].OriginalRequest.FileContainingSymbol);
    }

    /// <summary>
    /// What grpcurl's describe (with no symbol), grpcui and Postman do: list the services, then fetch the schema of each.
    /// One listed but not resolvable (v1alpha was) fails the whole client.
    /// </summary>
    [Fact]
    public async Task Every_listed_service_resolves_to_a_file_that_defines_it()
    {
        await using var host = Host();
        await host.StartAsync();
        await AssertEveryServiceResolvesAsync(host.GrpcEndpoint!);
    }

    private static async Task AssertEveryServiceResolvesAsync(System.Net.IPEndPoint server)
    {
        string[] services = [.. (await AskAsync(server, V1, new ServerReflectionRequest { ListServices = "*" }))[0].ListServicesResponse.Service.Select(s => s.Name)];
        Assert.Contains("grpc.reflection.v1alpha.ServerReflection", services);
        var answers = await AskAsync(server, V1Alpha, [.. services.Select(s => new ServerReflectionRequest { FileContainingSymbol = s })]);
        for (int i = 0; i < services.Length; i++)
        {
            Assert.True(answers[i].MessageResponseCase == ServerReflectionResponse.MessageResponseOneofCase.FileDescriptorResponse,
                $"{services[i]}: {answers[i].ErrorResponse?.ErrorMessage}");
            IReadOnlyList<FileDescriptor> built = FileDescriptor.BuildFromByteStrings(answers[i].FileDescriptorResponse.FileDescriptorProto.Reverse());
            ServiceDescriptor service = built.SelectMany(f => f.Services).Single(s => s.FullName == services[i]);
            Assert.NotEmpty(service.Methods);
            Assert.All(service.Methods, m => Assert.StartsWith(service.File.Package + ".", m.InputType.FullName, StringComparison.Ordinal));
        }
    }

    [Fact]
    public async Task A_question_it_cannot_answer_gets_an_error_response_and_the_stream_goes_on()
    {
        await using var host = Host();
        await host.StartAsync();
        var answers = await AskAsync(host, V1Alpha,
            new ServerReflectionRequest { FileContainingSymbol = "kvfabric.v1.NoSuchThing" },
            new ServerReflectionRequest { FileByFilename = "nope.proto" },
            new ServerReflectionRequest(),
            new ServerReflectionRequest { FileContainingExtension = new ExtensionRequest { ContainingType = "kvfabric.v1.LookupRequest", ExtensionNumber = 100 } },
            new ServerReflectionRequest { AllExtensionNumbersOfType = "kvfabric.v1.LookupRequest" },
            new ServerReflectionRequest { AllExtensionNumbersOfType = "kvfabric.v1.Nope" },
            new ServerReflectionRequest { FileByFilename = "grpc/health/v1/health.proto" });

        Assert.Equal((int)StatusCode.NotFound, answers[0].ErrorResponse.ErrorCode);
        Assert.Contains("kvfabric.v1.NoSuchThing", answers[0].ErrorResponse.ErrorMessage, StringComparison.Ordinal);
        Assert.Equal((int)StatusCode.NotFound, answers[1].ErrorResponse.ErrorCode);
        Assert.Contains("kvfabric/v1/fabric.proto", answers[1].ErrorResponse.ErrorMessage, StringComparison.Ordinal); // it says what there is
        Assert.Equal((int)StatusCode.InvalidArgument, answers[2].ErrorResponse.ErrorCode);
        Assert.Equal((int)StatusCode.NotFound, answers[3].ErrorResponse.ErrorCode);
        Assert.Equal("kvfabric.v1.LookupRequest", answers[4].AllExtensionNumbersResponse.BaseTypeName);
        Assert.Empty(answers[4].AllExtensionNumbersResponse.ExtensionNumber);
        Assert.Equal((int)StatusCode.NotFound, answers[5].ErrorResponse.ErrorCode);
        Assert.Equal("grpc/health/v1/health.proto", FileDescriptorProto.Parser.ParseFrom(answers[6].FileDescriptorResponse.FileDescriptorProto[0]).Name);
    }

    [Fact]
    public async Task A_worker_serves_its_own_schema()
    {
        var options = new KvFabric.Workers.Serving.WorkerOptions
        {
            Role = KvFabric.Workers.Serving.WorkerRole.Colocated, Name = "reflected", Model = "tiny", KvBlocks = 64, Sidecar = "http://127.0.0.1:1",
        };
        await using var worker = new KvFabric.Workers.Serving.WorkerServer(options, NullLoggerFactory.Instance);
        await worker.StartAsync();
        var answers = await AskAsync(worker.Endpoint!, V1,
            new ServerReflectionRequest { ListServices = "" },
            new ServerReflectionRequest { FileContainingSymbol = "kvfabric.v1.Worker.Generate" },
            new ServerReflectionRequest { FileContainingSymbol = "kvfabric.v1.Fabric" });
        Assert.Equal(["grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection", "kvfabric.v1.Worker"],
            answers[0].ListServicesResponse.Service.Select(s => s.Name));
        Assert.Equal("kvfabric/v1/worker.proto", FileDescriptorProto.Parser.ParseFrom(answers[1].FileDescriptorResponse.FileDescriptorProto[0]).Name);
        Assert.Equal((int)StatusCode.NotFound, answers[2].ErrorResponse.ErrorCode); // a worker does not serve the sidecar's API
        await AssertEveryServiceResolvesAsync(worker.Endpoint!);
    }

    [Fact]
    public async Task Turned_off_it_is_not_served()
    {
        await using var host = Host(reflection: false);
        await host.StartAsync();
        var e = await Assert.ThrowsAsync<RpcException>(() => AskAsync(host, V1, new ServerReflectionRequest { ListServices = "" }));
        Assert.Equal(StatusCode.Unimplemented, e.Status);
        Assert.DoesNotContain(host.Router.Services, s => s.StartsWith("grpc.reflection", StringComparison.Ordinal));
    }
}
