#!/usr/bin/env python3
"""How much an admission filter would need to know. Replays the trace through LRU (prefix semantics, a request's chain
pinned while it is put, only full 512-token blocks stored, as in `kvfabric-bench replay`; plain LRU here gives the
replay's LRU figure) behind a door that is told the future:

  ever      admits a block only if some later request uses it again (perfect knowledge of reuse, none of its timing);
  within H  admits it only if a later request within H requests uses it;
  R / X     a predictor of that knowledge with recall R and false-positive rate X, deciding per request (a
            pseudo-random draw per request, so a chain is kept or refused as a whole): a block used again is
            admitted if the request's draw is under R, a block never used again if an independent draw is under X.

A refused block ends its chain's put (a child cannot be cached without its parent).
usage: admission_oracle.py TRACE [CAPACITY ...]   (docs/tiers-policies.md, "Why 55% of Belady ...")
"""
import bisect
import collections
import json
import sys

TOKENS = 512


def main():
    trace = sys.argv[1]
    capacities = [int(c) for c in sys.argv[2:]] or [1000, 4000, 16000]
    reqs = [json.loads(line) for line in open(trace)]
    uses = collections.defaultdict(list)
    for i, r in enumerate(reqs):
        for h in r["hash_ids"]:
            uses[h].append(i)

    def next_use(h, i):
        u = uses[h]
        k = bisect.bisect_right(u, i)
        return u[k] if k < len(u) else None

    def predictor(recall, false_positives):
        # Deterministic draws per request index: a chain's blocks share their draw, as a real predictor's verdict would.
        return lambda h, i: (i * 2654435761 % 1000 < recall * 1000) if next_use(h, i) is not None \
            else (i * 40503 + 7) % 1000 < false_positives * 1000

    doors = [("lru (no door)", lambda h, i: True), ("ever used again", lambda h, i: next_use(h, i) is not None)]
    doors += [(f"used again within {w} requests", (lambda w: lambda h, i: (lambda n: n is not None and n - i <= w)(next_use(h, i)))(w))
              for w in (500, 1000, 2000)]
    doors += [(f"recall {r:.1f}, false positives {x:.1f}", predictor(r, x)) for r in (1.0, 0.8) for x in (0.1, 0.2, 0.3, 0.5)]
    for capacity in capacities:
        for name, door in doors:
            print(f"{capacity:6d} blocks  {name:34s} {100 * replay(reqs, capacity, door):6.2f}%")


def replay(reqs, capacity, admit):
    cache = collections.OrderedDict()  # least recently used first
    hits = total = 0
    for i, r in enumerate(reqs):
        matched = 0
        for h in r["hash_ids"]:
            if h not in cache:
                break
            matched += 1
        hits += min(matched * TOKENS, r["input_length"])
        total += r["input_length"]
        full = r["hash_ids"][: r["input_length"] // TOKENS]
        pinned = set(full)
        stored = []
        for h in full:
            if h not in cache:
                if not admit(h, i):
                    break
                if len(cache) >= capacity:
                    victim = next((k for k in cache if k not in pinned), None)
                    if victim is None:
                        break
                    del cache[victim]
                cache[h] = True
            stored.append(h)
        for h in reversed(stored):  # parents most recent: leaf-first order for LRU
            cache.move_to_end(h)
    return hits / total


if __name__ == "__main__":
    main()
