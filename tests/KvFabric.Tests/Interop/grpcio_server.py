"""A grpcio server implementing part of kvfabric.v1.Fabric (and the standard health service) in memory, so that
KvFabric's own client is tested against a gRPC server no one on this project wrote.

usage: grpcio_server.py PROTO_ROOT    (prints "READY <port>")
"""
import sys
import time
from concurrent import futures

import grpc

import pystubs


def main():
    pb = pystubs.generate(sys.argv[1])
    fabric_pb2, health = pb["fabric"], pb["health"]
    blocks = {}

    def authorized(context):
        md = dict(context.invocation_metadata())
        if md.get("authorization") != "Bearer py-token" or md.get("x-kvfabric-tenant") != "py":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "bad token")

    class Fabric(pb["fabric_grpc"].FabricServicer):
        def Lookup(self, request, context):
            authorized(context)
            n = 0
            while n * 16 < len(request.hashes) and request.hashes[n * 16:n * 16 + 16] in blocks:
                n += 1
            return fabric_pb2.LookupResponse(matched_blocks=n, tiers=[pb["common"].TIER_HOST] * n)

        def Put(self, request_iterator, context):
            authorized(context)
            stored, received, current = 0, 0, None
            for m in request_iterator:
                if m.hash:
                    current = m.hash
                    blocks[current] = bytearray()
                    stored += 1
                blocks[current] += m.data
                received += len(m.data)
            return fabric_pb2.PutResponse(stored=stored, bytes_received=received)

        def Get(self, request, context):
            authorized(context)
            context.set_compression(grpc.Compression.Gzip)
            hashes = [request.hashes[i:i + 16] for i in range(0, len(request.hashes), 16)]
            for h in hashes:
                if h not in blocks:
                    context.abort(grpc.StatusCode.NOT_FOUND, "block %s not here" % h.hex())
            for h in hashes:
                data = bytes(blocks[h])
                for off in range(0, len(data), 4096):
                    r = fabric_pb2.GetResponse(offset=off, data=data[off:off + 4096])
                    if off == 0:
                        r.hash, r.block_length, r.tier = h, len(data), pb["common"].TIER_HOST
                    yield r

        def Stats(self, request, context):
            authorized(context)
            time.sleep(5)
            return fabric_pb2.StatsResponse(node="python")

    def check(request, context):
        return health.HealthCheckResponse(status=health.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb["fabric_grpc"].add_FabricServicer_to_server(Fabric(), server)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check, request_deserializer=health.HealthCheckRequest.FromString,
                                                     response_serializer=health.HealthCheckResponse.SerializeToString),
    }),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print("READY", port, flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
