"""What grpcurl does, with grpcio and protobuf alone: no KvFabric stubs. Discovers the sidecar's services over gRPC
server reflection, builds their message types from the FileDescriptorProtos it gets back, and calls methods with them.

usage: grpcio_reflection_client.py PROTO_ROOT ADDRESS TENANT TOKEN CACHED_CHAIN_HEX
CACHED_CHAIN_HEX: a packed chain (16 bytes per block, hex) whose blocks are all cached in the host tier.
Prints "OK <check>" per passed check and "ALL OK" at the end; any failure raises with a message.
"""
import importlib.util
import os
import sys
import tempfile

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_tools import protoc

PATHS = {
    "v1": "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
    "v1alpha": "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
}


def reflection_messages(proto_root):
    """Only the reflection protocol's own messages are generated (the standard protocol, as grpcurl has it built in).
    Loaded by file path: the package path grpc/reflection/v1 would collide with grpcio's own 'grpc' package."""
    out = tempfile.mkdtemp(prefix="kvfabric-reflection-")
    name = os.path.join("grpc", "reflection", "v1", "reflection.proto")
    if protoc.main(["protoc", "-I" + proto_root, "--python_out=" + out, name]) != 0:
        raise SystemExit("protoc failed for " + name)
    spec = importlib.util.spec_from_file_location("kvfabric_reflection_pb2", os.path.join(out, "grpc", "reflection", "v1", "reflection_pb2.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def message_class(descriptor):
    get = getattr(message_factory, "GetMessageClass", None)  # protobuf >= 4.22
    return get(descriptor) if get else message_factory.MessageFactory(descriptor.file.pool).GetPrototype(descriptor)


def main():
    proto_root, address, tenant, token, cached_hex = sys.argv[1:6]
    cached = bytes.fromhex(cached_hex)
    r = reflection_messages(proto_root)
    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=20)

    def ask(path, requests):
        call = channel.stream_stream(path, request_serializer=r.ServerReflectionRequest.SerializeToString,
                                     response_deserializer=r.ServerReflectionResponse.FromString)
        return list(call(iter(requests), timeout=20))  # no credentials: reflection is open, like health

    # One stream, several questions, answered in order.
    answers = ask(PATHS["v1"], [
        r.ServerReflectionRequest(list_services=""),
        r.ServerReflectionRequest(file_containing_symbol="kvfabric.v1.Fabric"),
        r.ServerReflectionRequest(file_containing_symbol="no.such.Service"),
        r.ServerReflectionRequest(file_containing_symbol="kvfabric.v1.Index.Route"),
    ])
    assert len(answers) == 4, "expected 4 answers, got %d" % len(answers)
    services = {s.name for s in answers[0].list_services_response.service}
    for expected in ("kvfabric.v1.Fabric", "kvfabric.v1.Index", "kvfabric.v1.Transfer", "grpc.health.v1.Health",
                     "grpc.reflection.v1.ServerReflection", "grpc.reflection.v1alpha.ServerReflection"):
        assert expected in services, "list_services lacks %s: %s" % (expected, sorted(services))
    print("OK list_services:", ", ".join(sorted(services)))
    assert answers[2].WhichOneof("message_response") == "error_response", answers[2]
    assert answers[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0], answers[2].error_response
    assert answers[2].original_request.file_containing_symbol == "no.such.Service"
    print("OK unknown symbol -> NOT_FOUND |", answers[2].error_response.error_message)

    # Build the schema from what the server sent, dependencies before the files that import them.
    pool = descriptor_pool.DescriptorPool()
    files = {}
    for a in (answers[1], answers[3]):
        assert a.WhichOneof("message_response") == "file_descriptor_response", a
        for raw in a.file_descriptor_response.file_descriptor_proto:
            fd = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[fd.name] = fd
    assert files.keys() >= {"kvfabric/v1/fabric.proto", "kvfabric/v1/common.proto", "kvfabric/v1/index.proto"}, sorted(files)
    added = set()
    while len(added) < len(files):
        ready = [n for n, fd in files.items() if n not in added and all(d in added for d in fd.dependency)]
        assert ready, "the answers lack a dependency: have %s" % sorted(files)
        for n in ready:
            pool.Add(files[n])
            added.add(n)
    fabric = pool.FindServiceByName("kvfabric.v1.Fabric")
    methods = {m.name for m in fabric.methods}
    assert {"Lookup", "Put", "Get", "Pin", "Unpin", "Delete", "Stats"} <= methods, sorted(methods)
    print("OK schema of kvfabric.v1.Fabric:", ", ".join(sorted(methods)))

    # Call with messages made from the reflected schema alone.
    md = (("authorization", "Bearer " + token), ("x-kvfabric-tenant", tenant))

    def unary(service, method_name, request):
        m = service.FindMethodByName(method_name)
        request_type, response_type = message_class(m.input_type), message_class(m.output_type)
        call = channel.unary_unary("/%s/%s" % (service.full_name, m.name), request_serializer=request_type.SerializeToString,
                                   response_deserializer=response_type.FromString)
        return call(request_type(**request), metadata=md, timeout=20)

    looked = unary(fabric, "Lookup", {"hashes": cached})
    host = pool.FindEnumTypeByName("kvfabric.v1.Tier").values_by_name["TIER_HOST"].number
    blocks = len(cached) // 16
    assert looked.matched_blocks == blocks, "Lookup matched %d of %d cached blocks" % (looked.matched_blocks, blocks)
    assert list(looked.tiers) == [host] * blocks, "tiers %s, expected TIER_HOST (%d) each" % (list(looked.tiers), host)
    print("OK reflected Lookup: %d blocks in TIER_HOST" % blocks)
    stats = unary(fabric, "Stats", {})
    assert any(t.tier == host and t.blocks >= blocks for t in stats.tiers), stats
    print("OK reflected Stats")
    try:
        unary(fabric, "Lookup", {"hashes": b"short"})
        raise AssertionError("a 5-byte chain was accepted")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        print("OK reflected Lookup of a bad chain -> INVALID_ARGUMENT |", e.details())

    # Older clients ask v1alpha: the same answers.
    alpha = ask(PATHS["v1alpha"], [r.ServerReflectionRequest(file_by_filename="kvfabric/v1/common.proto")])
    names = [descriptor_pb2.FileDescriptorProto.FromString(b).name for b in alpha[0].file_descriptor_response.file_descriptor_proto]
    assert names and names[0] == "kvfabric/v1/common.proto", names
    print("OK v1alpha file_by_filename")
    print("ALL OK")


if __name__ == "__main__":
    main()
