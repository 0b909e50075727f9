"""A real gRPC client no one on this project wrote (grpcio) driving every KvFabric RPC against a running sidecar.

usage: grpcio_client.py PROTO_ROOT ADDRESS TENANT TOKEN BLOCK_BYTES MAX_MESSAGE_BYTES
Prints "OK <check>" per passed check and exits 0 only if all passed; any failure raises with a message.
"""
import hashlib
import random
import sys
import threading
import time

import grpc

import pystubs


def chain(seed, n):
    return [hashlib.sha256(("%s/%d" % (seed, i)).encode()).digest()[:16] for i in range(n)]


def block(n, seed):
    return random.Random(seed).randbytes(n)


def expect_code(code, fn, what):
    try:
        fn()
    except grpc.RpcError as e:
        if e.code() != code:
            raise AssertionError("%s: expected %s, got %s (%s)" % (what, code, e.code(), e.details()))
        print("OK", what, "->", code.name, "|", e.details())
        return e
    raise AssertionError("%s: expected %s, the call succeeded" % (what, code))


def main():
    proto_root, address, tenant, token, block_bytes, max_message = sys.argv[1:7]
    block_bytes, max_message = int(block_bytes), int(max_message)
    pb = pystubs.generate(proto_root)
    fabric_pb2, index_pb2, health = pb["fabric"], pb["index"], pb["health"]
    channel = grpc.insecure_channel(address, options=[("grpc.max_receive_message_length", 64 << 20)])
    grpc.channel_ready_future(channel).result(timeout=20)
    md = (("authorization", "Bearer " + token), ("x-kvfabric-tenant", tenant))
    fabric = pb["fabric_grpc"].FabricStub(channel)
    index = pb["index_grpc"].IndexStub(channel)
    transfer = pb["transfer_grpc"].TransferStub(channel)

    # Health: the standard protocol, no credentials.
    check = channel.unary_unary("/grpc.health.v1.Health/Check", request_serializer=health.HealthCheckRequest.SerializeToString,
                                response_deserializer=health.HealthCheckResponse.FromString)
    assert check(health.HealthCheckRequest(service=""), timeout=10).status == health.HealthCheckResponse.SERVING
    assert check(health.HealthCheckRequest(service="kvfabric.v1.Fabric"), timeout=10).status == health.HealthCheckResponse.SERVING
    print("OK health check")
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: check(health.HealthCheckRequest(service="nope.Service"), timeout=10), "health check of an unknown service")
    watch = channel.unary_stream("/grpc.health.v1.Health/Watch", request_serializer=health.HealthCheckRequest.SerializeToString,
                                 response_deserializer=health.HealthCheckResponse.FromString)
    stream = watch(health.HealthCheckRequest(service=""), timeout=10)
    assert next(stream).status == health.HealthCheckResponse.SERVING
    stream.cancel()
    print("OK health watch")

    # Put (client streaming, chunked), Lookup, Get (server streaming).
    hashes = chain("grpcio", 3)
    payloads = [block(block_bytes, 1000 + i) for i in range(3)]

    def put_messages():
        for i, h in enumerate(hashes):
            data = payloads[i]
            step = 1500
            for off in range(0, len(data), step):
                m = fabric_pb2.PutRequest(data=data[off:off + step])
                if off == 0:
                    m.hash, m.parent_hash, m.depth, m.block_length = h, (hashes[i - 1] if i else b""), i, len(data)
                yield m

    put = fabric.Put(put_messages(), metadata=md, timeout=20)
    assert put.stored == 3 and put.bytes_received == 3 * block_bytes, put
    print("OK put streamed 3 blocks")
    again = fabric.Put(put_messages(), metadata=md, timeout=20)
    assert again.stored == 0 and again.already_present == 3, again
    print("OK put is idempotent")
    look = fabric.Lookup(fabric_pb2.LookupRequest(hashes=b"".join(hashes + chain("grpcio-miss", 1))), metadata=md, timeout=10)
    assert look.matched_blocks == 3 and list(look.tiers) == [pb["common"].TIER_HOST] * 3, look
    print("OK lookup")
    got = {}
    current = None
    for r in fabric.Get(fabric_pb2.GetRequest(hashes=b"".join(hashes), chunk_bytes=4096), metadata=md, timeout=20):
        if r.hash:
            current = r.hash
            got[current] = bytearray(r.block_length)
        got[current][r.offset:r.offset + len(r.data)] = r.data
    assert [bytes(got[h]) for h in hashes] == payloads
    print("OK get streamed bytes back exactly")

    # gzip-compressed request messages are accepted.
    look = fabric.Lookup(fabric_pb2.LookupRequest(hashes=b"".join(hashes)), metadata=md, timeout=10, compression=grpc.Compression.Gzip)
    assert look.matched_blocks == 3
    print("OK gzip request")

    pin = fabric.Pin(fabric_pb2.PinRequest(hashes=hashes[0], lease_ms=60000), metadata=md, timeout=10)
    assert pin.pinned == 1
    assert fabric.Unpin(fabric_pb2.UnpinRequest(lease_id=pin.lease_id), metadata=md, timeout=10).released
    print("OK pin/unpin")
    stats = fabric.Stats(fabric_pb2.StatsRequest(), metadata=md, timeout=10)
    assert stats.layout.block_bytes == block_bytes and stats.tenant_blocks >= 3, stats
    print("OK stats")
    res = fabric.Reserve(fabric_pb2.ReserveRequest(blocks=1), metadata=md, timeout=10)
    assert len(res.slots) == 1 and res.slots[0].length == block_bytes
    assert fabric.Release(fabric_pb2.ReleaseRequest(reservation_id=res.reservation_id), metadata=md, timeout=10).released
    print("OK reserve/release")

    match = index.Match(index_pb2.MatchRequest(hashes=b"".join(hashes)), metadata=md, timeout=10)
    assert len(match.matches) == 1 and match.matches[0].matched_blocks == 3 and match.matches[0].host_blocks == 3, match
    route = index.Route(index_pb2.RouteRequest(hashes=b"".join(hashes)), metadata=md, timeout=10)
    assert route.expected_hit_blocks == 3 and route.node, route
    print("OK match/route")

    # SubscribeEvents: the three blocks' Stored event(s) arrive; then the client cancels the stream.
    events = index.SubscribeEvents(index_pb2.SubscribeEventsRequest(from_sequence=1), metadata=md)
    seen = []
    for e in events:
        if e.WhichOneof("body") == "stored":
            seen.extend(e.stored.hashes[i:i + 16] for i in range(0, len(e.stored.hashes), 16))
        if all(h in seen for h in hashes):
            break
    events.cancel()
    print("OK subscribe events, then cancel")

    meta = transfer.GetMetadata(pb["transfer"].GetMetadataRequest(), metadata=md, timeout=10)
    assert len(meta.metadata) > 0
    print("OK transfer metadata")

    # Deadlines and cancellation.
    expect_code(grpc.StatusCode.DEADLINE_EXCEEDED,
                lambda: list(index.SubscribeEvents(index_pb2.SubscribeEventsRequest(from_sequence=1 << 62), metadata=md, timeout=0.3)),
                "deadline on a stream that never ends")
    future = index.SubscribeEvents(index_pb2.SubscribeEventsRequest(from_sequence=1 << 62), metadata=md)
    threading.Timer(0.3, future.cancel).start()
    expect_code(grpc.StatusCode.CANCELLED, lambda: list(future), "client cancellation")

    # Bad input: precise statuses.
    expect_code(grpc.StatusCode.UNAUTHENTICATED, lambda: fabric.Lookup(fabric_pb2.LookupRequest(), timeout=10), "no token")
    expect_code(grpc.StatusCode.UNAUTHENTICATED,
                lambda: fabric.Lookup(fabric_pb2.LookupRequest(), metadata=(("authorization", "Bearer nope"), ("x-kvfabric-tenant", tenant)), timeout=10),
                "bad token")
    expect_code(grpc.StatusCode.PERMISSION_DENIED,
                lambda: fabric.Lookup(fabric_pb2.LookupRequest(), metadata=(("authorization", "Bearer " + token), ("x-kvfabric-tenant", "somebody-else")), timeout=10),
                "unknown tenant")
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: fabric.Lookup(fabric_pb2.LookupRequest(hashes=b"x" * 17), metadata=md, timeout=10),
                "hash of the wrong length")
    expect_code(grpc.StatusCode.NOT_FOUND, lambda: list(fabric.Get(fabric_pb2.GetRequest(hashes=chain("absent", 1)[0]), metadata=md, timeout=10)),
                "get of a missing block")
    wrong = chain("wrong-size", 1)[0]
    expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                lambda: fabric.Put(iter([fabric_pb2.PutRequest(hash=wrong, block_length=block_bytes - 1, data=b"\0" * (block_bytes - 1))]), metadata=md, timeout=10),
                "block of the wrong size")
    expect_code(grpc.StatusCode.INVALID_ARGUMENT,
                lambda: fabric.Put(iter([fabric_pb2.PutRequest(hash=wrong, block_length=block_bytes, data=b"\0" * 10)]), metadata=md, timeout=10),
                "stream ending inside a block")
    assert fabric.Lookup(fabric_pb2.LookupRequest(hashes=wrong), metadata=md, timeout=10).matched_blocks == 0
    raw = channel.unary_unary("/kvfabric.v1.Fabric/Lookup", request_serializer=lambda b: b, response_deserializer=lambda b: b)
    expect_code(grpc.StatusCode.INVALID_ARGUMENT, lambda: raw(b"\x0a\xff\xff\xff", metadata=md, timeout=10), "malformed protobuf")
    expect_code(grpc.StatusCode.RESOURCE_EXHAUSTED,
                lambda: fabric.Put(iter([fabric_pb2.PutRequest(hash=wrong, block_length=block_bytes, data=b"\0" * (max_message + 1))]), metadata=md, timeout=10),
                "message over the size limit")
    expect_code(grpc.StatusCode.UNIMPLEMENTED,
                lambda: channel.unary_unary("/kvfabric.v1.Fabric/NoSuchCall", request_serializer=lambda b: b, response_deserializer=lambda b: b)(b"", metadata=md, timeout=10),
                "unknown method")
    assert fabric.Lookup(fabric_pb2.LookupRequest(hashes=wrong), metadata=md, timeout=10).matched_blocks == 0
    print("OK nothing stored by bad input")
    print("ALL OK")


if __name__ == "__main__":
    main()
