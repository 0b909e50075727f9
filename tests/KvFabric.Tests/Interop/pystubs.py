"""Generates Python stubs for KvFabric's .proto files at test time (grpc_tools.protoc) and imports them.

grpc.health.v1 is generated too but loaded by file path: its package path ("grpc/health/v1") would collide with grpcio's
own "grpc" package if imported by name.
"""
import importlib.util
import os
import sys
import tempfile

from grpc_tools import protoc


def generate(proto_root):
    out = tempfile.mkdtemp(prefix="kvfabric-pystubs-")
    files = [os.path.join("kvfabric", "v1", f) for f in sorted(os.listdir(os.path.join(proto_root, "kvfabric", "v1")))]
    files.append(os.path.join("grpc", "health", "v1", "health.proto"))
    args = ["protoc", "-I" + proto_root, "--python_out=" + out, "--grpc_python_out=" + out] + files
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed for " + " ".join(files))
    sys.path.insert(0, out)
    spec = importlib.util.spec_from_file_location("kvfabric_health_pb2", os.path.join(out, "grpc", "health", "v1", "health_pb2.py"))
    health = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(health)
    from kvfabric.v1 import common_pb2, fabric_pb2, fabric_pb2_grpc, index_pb2, index_pb2_grpc, transfer_pb2, transfer_pb2_grpc
    return {
        "common": common_pb2, "fabric": fabric_pb2, "fabric_grpc": fabric_pb2_grpc, "index": index_pb2,
        "index_grpc": index_pb2_grpc, "transfer": transfer_pb2, "transfer_grpc": transfer_pb2_grpc, "health": health,
    }
