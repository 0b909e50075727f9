using Google.Protobuf;
using Google.Protobuf.Reflection;
using Grpc.Reflection.V1;
using KvFabric.Client.Grpc;

namespace KvFabric.Rpc;

/// <summary>
/// grpc.reflection.v1.ServerReflection (and its older twin v1alpha, identical on the wire): lists the services the
/// router serves and hands out the schema of each as serialized FileDescriptorProtos, so grpcurl, Postman, evans or a
/// grpcio-reflection client can call any method without our .proto files. No credentials are needed: it tells only
/// what docs/api.md publishes, never a tenant's data.
/// </summary>
public sealed class ReflectionService
{
    public const string Name = "grpc.reflection.v1.ServerReflection";
    public const string AlphaName = "grpc.reflection.v1alpha.ServerReflection";

    private readonly GrpcRouter _router;
    private readonly Dictionary<string, FileDescriptor> _files = new(StringComparer.Ordinal);
    private readonly Dictionary<string, FileDescriptor> _symbols = new(StringComparer.Ordinal);
    private readonly HashSet<string> _messageTypes = new(StringComparer.Ordinal);

    /// <param name="router">The services listed are those routed when a client asks (this one included).</param>
    /// <param name="files">The files whose services, messages and enums are served, with everything they import.</param>
    public ReflectionService(GrpcRouter router, IEnumerable<FileDescriptor> files)
    {
        _router = router;
        foreach (FileDescriptor f in files)
            Index(f);
        Index(ReflectionReflection.Descriptor);
        Index(AlphaDescriptor.Value);
    }

    /// <summary>
    /// The schema of grpc.reflection.v1alpha: v1's file under v1alpha's name and package (the protocol's two versions are
    /// the same messages). list_services names the v1alpha service, so it must resolve too: grpcurl's describe (all
    /// services), grpcui and Postman fetch the schema of every listed service and fail on one that is NOT_FOUND.
    /// </summary>
    internal static readonly Lazy<FileDescriptor> AlphaDescriptor = new(() =>
    {
        const string from = ".grpc.reflection.v1.", to = ".grpc.reflection.v1alpha.";
        FileDescriptorProto proto = FileDescriptorProto.Parser.ParseFrom(ReflectionReflection.Descriptor.SerializedData);
        proto.Name = "grpc/reflection/v1alpha/reflection.proto";
        proto.Package = "grpc.reflection.v1alpha";
        proto.Options?.ClearCsharpNamespace();
        static string Renamed(string type) => type.StartsWith(from, StringComparison.Ordinal) ? to + type[from.Length..] : type;
        static void Rename(DescriptorProto message)
        {
            foreach (FieldDescriptorProto f in message.Field.Where(f => f.HasTypeName))
                f.TypeName = Renamed(f.TypeName);
            foreach (DescriptorProto nested in message.NestedType)
                Rename(nested);
        }

        foreach (DescriptorProto m in proto.MessageType)
            Rename(m);
        foreach (ServiceDescriptorProto s in proto.Service)
        {
            foreach (MethodDescriptorProto m in s.Method)
            {
                m.InputType = Renamed(m.InputType);
                m.OutputType = Renamed(m.OutputType);
            }
        }

        return FileDescriptor.BuildFromByteStrings([proto.ToByteString()])[0];
    });

    public void Register(GrpcRouter router)
    {
        router.Bidirectional($"/{Name}/ServerReflectionInfo", ServeAsync, authenticated: false);
        router.Bidirectional($"/{AlphaName}/ServerReflectionInfo", ServeAsync, authenticated: false);
    }

    private async Task ServeAsync(ServerCall call)
    {
        while (await call.ReadAsync(ServerReflectionRequest.Parser).ConfigureAwait(false) is { } request)
            await call.WriteAsync(Answer(request)).ConfigureAwait(false);
    }

    /// <summary>The answer to one request: a schema, a list, or an error response (the stream itself stays OK).</summary>
    public ServerReflectionResponse Answer(ServerReflectionRequest request)
    {
        var response = new ServerReflectionResponse { ValidHost = request.Host, OriginalRequest = request };
        switch (request.MessageRequestCase)
        {
            case ServerReflectionRequest.MessageRequestOneofCase.ListServices:
                var list = new ListServiceResponse();
                foreach (string s in _router.Services.Order(StringComparer.Ordinal))
                    list.Service.Add(new ServiceResponse { Name = s });
                response.ListServicesResponse = list;
                break;
            case ServerReflectionRequest.MessageRequestOneofCase.FileByFilename:
                response = _files.TryGetValue(request.FileByFilename, out FileDescriptor? byName)
                    ? WithFile(response, byName)
                    : Error(response, StatusCode.NotFound, $"no file '{request.FileByFilename}' here; ask for a symbol (list_services names them) or one of: "
                        + string.Join(", ", _files.Keys.Order(StringComparer.Ordinal)));
                break;
            case ServerReflectionRequest.MessageRequestOneofCase.FileContainingSymbol:
                string symbol = request.FileContainingSymbol.TrimStart('.');
                response = _symbols.TryGetValue(symbol, out FileDescriptor? bySymbol)
                    ? WithFile(response, bySymbol)
                    : Error(response, StatusCode.NotFound, $"no symbol '{request.FileContainingSymbol}' here: give a fully qualified service, method, message, "
                        + "enum or field name, e.g. kvfabric.v1.Fabric or kvfabric.v1.Fabric.Lookup (list_services lists the services)");
                break;
            case ServerReflectionRequest.MessageRequestOneofCase.FileContainingExtension:
                ExtensionRequest ext = request.FileContainingExtension;
                response = Error(response, StatusCode.NotFound,
                    $"no extension {ext.ExtensionNumber} of '{ext.ContainingType}': the services here define no extensions");
                break;
            case ServerReflectionRequest.MessageRequestOneofCase.AllExtensionNumbersOfType:
                string type = request.AllExtensionNumbersOfType.TrimStart('.');
                response = _messageTypes.Contains(type)
                    ? WithExtensions(response, type)
                    : Error(response, StatusCode.NotFound, $"no message type '{request.AllExtensionNumbersOfType}' here");
                break;
            default:
                response = Error(response, StatusCode.InvalidArgument,
                    "the request names no question: set one of list_services, file_by_filename, file_containing_symbol, file_containing_extension, all_extension_numbers_of_type");
                break;
        }

        return response;
    }

    private static ServerReflectionResponse WithExtensions(ServerReflectionResponse response, string type)
    {
        response.AllExtensionNumbersResponse = new ExtensionNumberResponse { BaseTypeName = type };
        return response;
    }

    // The file first, then every file it imports, transitively, each once: a client can build its descriptor pool from
    // this one answer.
    private static ServerReflectionResponse WithFile(ServerReflectionResponse response, FileDescriptor file)
    {
        var answer = new FileDescriptorResponse();
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var pending = new Queue<FileDescriptor>([file]);
        while (pending.TryDequeue(out FileDescriptor? f))
        {
            if (!seen.Add(f.Name))
                continue;
            answer.FileDescriptorProto.Add(f.SerializedData);
            foreach (FileDescriptor d in f.Dependencies)
                pending.Enqueue(d);
        }

        response.FileDescriptorResponse = answer;
        return response;
    }

    private static ServerReflectionResponse Error(ServerReflectionResponse response, StatusCode code, string message)
    {
        response.ErrorResponse = new ErrorResponse { ErrorCode = (int)code, ErrorMessage = message };
        return response;
    }

    private void Index(FileDescriptor file)
    {
        if (!_files.TryAdd(file.Name, file))
            return;
        foreach (FileDescriptor d in file.Dependencies)
            Index(d);
        foreach (ServiceDescriptor s in file.Services)
        {
            _symbols[s.FullName] = file;
            foreach (MethodDescriptor m in s.Methods)
                _symbols[m.FullName] = file;
        }

        foreach (MessageDescriptor m in file.MessageTypes)
            IndexMessage(m, file);
        foreach (EnumDescriptor e in file.EnumTypes)
            IndexEnum(e, file);
    }

    private void IndexMessage(MessageDescriptor message, FileDescriptor file)
    {
        _symbols[message.FullName] = file;
        _messageTypes.Add(message.FullName);
        foreach (FieldDescriptor f in message.Fields.InDeclarationOrder())
            _symbols[f.FullName] = file;
        foreach (OneofDescriptor o in message.Oneofs)
            _symbols[o.FullName] = file;
        foreach (MessageDescriptor nested in message.NestedTypes)
            IndexMessage(nested, file);
        foreach (EnumDescriptor e in message.EnumTypes)
            IndexEnum(e, file);
    }

    private void IndexEnum(EnumDescriptor e, FileDescriptor file)
    {
        _symbols[e.FullName] = file;
        // protobuf scopes an enum's values beside the enum (kvfabric.v1.TIER_HOST), not inside it
        string scope = e.ContainingType?.FullName ?? file.Package;
        foreach (EnumValueDescriptor v in e.Values)
            _symbols[scope.Length == 0 ? v.Name : $"{scope}.{v.Name}"] = file;
    }
}
