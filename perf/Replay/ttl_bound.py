#!/usr/bin/env python3
"""A reference hit rate for eviction policies that see only a block's class (its use count, optionally one more feature)
and its age: each class gets its own hold time (TTL) after its last use, chosen in hindsight to maximize token hits
under the cache's average occupancy (a Lagrangian over per-class TTLs). Leaf-first and per-request pinning are
ignored. Not a strict bound (a policy also sees depth, its sketch's decay, ...), a yardstick. Only full 512-token blocks are stored, as in `kvfabric-bench replay`.

usage: ttl_bound.py TRACE [count|prevgap|kids|wallclock] [CAPACITY ...]   (docs/tiers-policies.md, "Why 55% of Belady ...")
"""
import bisect
import collections
import json
import math
import sys

TOKENS = 512


def main():
    trace = sys.argv[1]
    feature = sys.argv[2] if len(sys.argv) > 2 else "count"
    capacities = [int(c) for c in sys.argv[3:]] or [1000, 4000, 16000]
    reqs = [json.loads(line) for line in open(trace)]
    n = len(reqs)
    total = sum(r["input_length"] for r in reqs)
    uses = collections.defaultdict(list)
    kids = collections.defaultdict(set)
    nkids = collections.defaultdict(list)
    for i, r in enumerate(reqs):
        full = r["hash_ids"][: r["input_length"] // TOKENS]
        for d, h in enumerate(full):
            uses[h].append(i)
            if d + 1 < len(full):
                kids[h].add(full[d + 1])
            nkids[h].append(len(kids[h]))

    def klass(h, u, k):
        c = min(k + 1, 6)
        if feature == "prevgap":
            return (c, -1 if k == 0 else min(int(math.log2(u[k] - u[k - 1] + 1)), 11))
        if feature == "wallclock":  # seconds between the last two uses: not something the policy contract carries
            return (c, -1 if k == 0 else min(int(math.log2((reqs[u[k]]["timestamp"] - reqs[u[k - 1]]["timestamp"]) / 1000 + 1)), 12))
        if feature == "kids":
            return (c, min(nkids[h][k], 4))
        return c

    # Per class: (gap to the next use, reused?) for every use; a last use holds until the end of the trace.
    events = collections.defaultdict(list)
    for h, u in uses.items():
        for k in range(len(u)):
            events[klass(h, u, k)].append((u[k + 1] - u[k], 1) if k + 1 < len(u) else (n - u[k], 0))
    ttls = list(range(0, 3000, 25)) + list(range(3000, 13000, 250))
    table = {}
    for c, ev in events.items():
        ev.sort()
        gaps = [g for g, _ in ev]
        reused = [0]
        for _, r in ev:
            reused.append(reused[-1] + r)
        prefix = [0]
        for g in gaps:
            prefix.append(prefix[-1] + g)
        rows = []
        for t in ttls:
            i = bisect.bisect_right(gaps, t)
            rows.append((t, reused[i], (prefix[i] + t * (len(gaps) - i)) / n))  # hits, mean blocks held
        table[c] = rows

    def at(lam):
        hits = occ = 0
        for rows in table.values():
            _, h, o = max(rows, key=lambda x: x[1] - lam * x[2] * n)
            hits += h
            occ += o
        return hits, occ

    for cap in capacities:
        lo, hi = 1e-9, 10.0
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if at(mid)[1] > cap:
                lo = mid
            else:
                hi = mid
        hits, occ = at(hi)
        print(f"{feature} {cap} blocks: best per-class TTL token hit rate {100 * hits * TOKENS / total:.2f}% (mean occupancy {occ:.0f})")


if __name__ == "__main__":
    main()
