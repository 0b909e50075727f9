#!/usr/bin/env python3
"""Writes the list of blocks that a first-reuse predictor admits at their first sighting, for
`kvfabric-bench replay --first-sighting-door FILE` (perf/Replay/FirstSightingDoor.cs): how good would a predictor of
"this new block will be used again" have to be for the cost policy to reach 55% of Belady, and how good is the best one
the trace's features allow, fitted in hindsight?

  oracle R X [W]  told the future: a first-sighted block used again (within W requests, default: ever) is admitted if
                  its request's draw is under R (recall), one not used again if an independent draw is under X (false-
                  positive rate). Draws are per request, so a chain is kept or refused as a whole, as a real predictor's
                  verdict would be; the same draws as admission_oracle.py.
  table T         a lookup table fitted on the whole trace in hindsight (so it overfits: better than any online
                  predictor over the same features): every first-sighted block is put in a cell of 7 features (a new or
                  a continued conversation; offset in the request's new tail, capped at 8; log2 of the new tail's
                  length; log2 of the output length; sightings of the block the tail hangs off, capped at 4; log2 of
                  the seconds since that block was last seen, capped at 8; the 10-minute slice of the trace), and the
                  blocks of every cell whose reuse rate is at least T are admitted. Prints the table's recall /
                  precision curve.

Only full 512-token blocks count, as in the replay. The ids go to stdout, a summary (recall, false-positive rate,
precision of the list) to stderr.
usage: first_reuse_door.py TRACE oracle R X [W] > FILE  |  first_reuse_door.py TRACE table T > FILE
(docs/tiers-policies.md, "How good a predictor the target asks for")
"""
import collections
import json
import math
import sys

TOKENS = 512


def log2(x):
    return 0 if x <= 0 else int(math.log2(x))


def main():
    trace, mode = sys.argv[1], sys.argv[2]
    reqs = [json.loads(line) for line in open(trace)]
    uses = collections.defaultdict(list)
    for i, r in enumerate(reqs):
        for h in full_blocks(r):
            uses[h].append(i)
    # First sightings in trace order: (block, request index, features).
    firsts = []
    seen = collections.Counter()
    last_ms = {}
    for i, r in enumerate(reqs):
        chain, full = r["hash_ids"], full_blocks(r)
        known = 0
        while known < len(chain) and seen[chain[known]] > 0:
            known += 1
        anchor = chain[known - 1] if known > 0 else None
        anchor_seen = min(seen[anchor], 4) if anchor is not None else 0
        idle = min(log2((r["timestamp"] - last_ms.get(anchor, r["timestamp"])) / 1000), 8) if known > 1 else -1
        for d, h in enumerate(full):
            if seen[h] == 0:
                features = (known <= 1, min(d - known, 8), log2(len(full) - known), log2(r["output_length"]),
                            anchor_seen, idle, r["timestamp"] // 600_000)
                firsts.append((h, i, features))
        for h in full:
            seen[h] += 1
            last_ms[h] = r["timestamp"]

    if mode == "oracle":
        recall, false_positives = float(sys.argv[3]), float(sys.argv[4])
        window = int(sys.argv[5]) if len(sys.argv) > 5 else None

        def admit(h, i, _):
            u = uses[h]
            reused = len(u) > 1 and (window is None or u[1] - i <= window)
            return (i * 2654435761 % 1000 < recall * 1000) if reused else (i * 40503 + 7) % 1000 < false_positives * 1000
    elif mode == "table":
        threshold = float(sys.argv[3])
        cells = collections.defaultdict(lambda: [0, 0])
        for h, _, f in firsts:
            cells[f][0] += 1
            cells[f][1] += len(uses[h]) > 1
        curve(cells)

        def admit(h, i, f):
            n, reused = cells[f]
            return reused >= threshold * n
    else:
        sys.exit(f"unknown mode {mode!r}: use oracle R X [W] or table T")

    tp = fp = positives = 0
    for h, i, f in firsts:
        reused = len(uses[h]) > 1
        positives += reused
        if admit(h, i, f):
            print(h)
            tp += reused
            fp += not reused
    negatives = len(firsts) - positives
    print(f"{mode} {' '.join(sys.argv[3:])}: admits {tp + fp} of {len(firsts)} first sightings; recall {tp / positives:.3f}, "
          f"false-positive rate {fp / negatives:.3f}, precision {tp / max(1, tp + fp):.3f} (base rate {positives / len(firsts):.3f})",
          file=sys.stderr)


def full_blocks(r):
    return r["hash_ids"][: r["input_length"] // TOKENS]


def curve(cells):
    """The table's best precision at each recall (cells taken in order of their reuse rate)."""
    positives = sum(c[1] for c in cells.values())
    negatives = sum(c[0] - c[1] for c in cells.values())
    admitted = reused = 0
    marks = [0.2, 0.4, 0.6, 0.8, 0.9, 1.0]
    print(f"table: {len(cells)} cells", file=sys.stderr)
    for n, r in sorted(cells.values(), key=lambda c: -c[1] / c[0]):
        admitted += n
        reused += r
        while marks and reused >= marks[0] * positives:
            print(f"  recall {marks.pop(0):.1f}: precision {reused / admitted:.3f}, false-positive rate "
                  f"{(admitted - reused) / negatives:.3f}", file=sys.stderr)


if __name__ == "__main__":
    main()
