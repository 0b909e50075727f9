#!/usr/bin/env python3
"""A second, independent implementation of KvFabric's block hashing spec v1 (docs/hashing.md).

Written from the spec text alone, with the standard library only, so that the C# implementation is checked
against another reading of the spec rather than against itself. Prints the test vectors as one JSON object;
BlockHashSpecCrossCheckTests runs it and compares every entry.
"""

import hashlib
import json
import struct

DTYPES = {"F32": 1, "F16": 2, "BF16": 3, "Fp8E4M3": 4, "Fp8E5M2": 5}


def u8(value):
    return struct.pack("<B", value)


def u32(value):
    return struct.pack("<I", value)


def string(text):
    data = text.encode("utf-8")
    return u32(len(data)) + data


def trunc128(message):
    return hashlib.sha256(message).digest()[:16]


def layout_canonical(model, layers, kv_heads, head_dim, dtype, tokens_per_block, tp_size=1, tp_rank=0):
    return (b"kvfabric.layout" + u8(1) + string(model)
            + u32(layers) + u32(kv_heads) + u32(head_dim) + u8(DTYPES[dtype])
            + u32(tokens_per_block) + u32(tp_size) + u32(tp_rank))


def layout_fingerprint(canonical):
    return trunc128(b"kvfabric.layout-fp/v1" + canonical)


def root(namespace, canonical):
    return trunc128(b"kvfabric.root/v1" + string(namespace) + u32(len(canonical)) + canonical)


def block(parent, tokens, extra=b""):
    return trunc128(b"kvfabric.block/v1" + parent + u32(len(tokens))
                    + struct.pack("<%dI" % len(tokens), *tokens) + u32(len(extra)) + extra)


def chain(root_hash, tokens_per_block, tokens):
    hashes, parent = [], root_hash
    for start in range(0, len(tokens) - tokens_per_block + 1, tokens_per_block):
        parent = block(parent, tokens[start:start + tokens_per_block])
        hashes.append(parent)
    return hashes


def token_sequence(count):
    return [(i * 7919 + 13) % 128256 for i in range(count)]


def main():
    layout_a = layout_canonical("tiny-llama@seed-1", 4, 2, 64, "F16", 16)
    layout_b = layout_canonical("llama-3-70b@sha256:0123abcd", 80, 8, 128, "BF16", 32, 4, 3)
    layout_c = layout_canonical("tiny-llama@seed-1", 4, 2, 64, "F16", 2048)
    root_a = root("dev", layout_a)
    tokens = token_sequence(53)

    vectors = {
        "layout_a_canonical": layout_a.hex(),
        "layout_a_fingerprint": layout_fingerprint(layout_a).hex(),
        "root_dev_a": root_a.hex(),
        "chain_dev_a": [h.hex() for h in chain(root_a, 16, tokens)],
        "block_extra_keys": block(root_a, tokens[:16], "lora:adapter-7".encode("utf-8")).hex(),
        "layout_b_fingerprint": layout_fingerprint(layout_b).hex(),
        "root_tenant_utf8_b": root("tenant-\u00e9\u4e2d", layout_b).hex(),
        "chain_dev_c_large_blocks": [h.hex() for h in chain(root("dev", layout_c), 2048, token_sequence(4096 + 7))],
    }
    print(json.dumps(vectors, indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
