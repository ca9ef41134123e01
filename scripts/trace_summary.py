#!/usr/bin/env python3
"""Where a profiled step's device time goes, from `fast pretrain --profile DIR` (or `fast bench
--profile`) Chrome traces: per CUDA stream, the busy time; the time the device was idle (all
gaps, including the ~1 us between consecutive kernels of a graph) and the part of it in gaps over
10 us (the device waiting for the host); the NCCL kernels' time, and how much of it ran alone
(exposed) rather than beside other kernels.

Usage: scripts/trace_summary.py STEPS TRACE.json [TRACE.json ...]   (one line per trace)
"""
import json
import sys


def merged(intervals):
    """The union of [start, end) intervals as disjoint [start, end] pairs, in order."""
    out = []
    for s, e in sorted(intervals):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def union(intervals):
    """Total length of the union of the intervals."""
    return sum(e - s for s, e in merged(intervals))


def long_gaps(intervals, over):
    """Total length of the gaps longer than `over` between the union of the intervals."""
    m = merged(intervals)
    return sum(b[0] - a[1] for a, b in zip(m, m[1:]) if b[0] - a[1] > over)


def alone(target, others):
    """Length of the parts of `target` intervals covered by no interval of `others`."""
    cover = merged(others)
    out, j = 0.0, 0
    for s, e in sorted(target):
        while j < len(cover) and cover[j][1] <= s:
            j += 1
        covered, k = 0.0, j
        while k < len(cover) and cover[k][0] < e:
            covered += min(e, cover[k][1]) - max(s, cover[k][0])
            k += 1
        out += (e - s) - covered
    return out


def summary(path, steps):
    events = json.load(open(path))
    events = events.get("traceEvents", events)
    kernels = [
        (ev["ts"], ev["ts"] + ev["dur"], ev.get("args", {}).get("stream", -1), ev.get("name", ""))
        for ev in events
        if ev.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and ev.get("dur", 0) > 0
    ]
    if not kernels:
        return f"{path}: no kernels"
    t0 = min(k[0] for k in kernels)
    t1 = max(k[1] for k in kernels)
    window = t1 - t0
    nccl = [(s, e) for s, e, _, n in kernels if "nccl" in n.lower()]
    rest = [(s, e) for s, e, _, n in kernels if "nccl" not in n.lower()]
    busy = union([(s, e) for s, e, _, _ in kernels])
    per = lambda us: f"{us / steps / 1e3:.3f}"  # noqa: E731  ms per step
    streams = {}
    for s, e, st, n in kernels:
        streams.setdefault(st, [0.0, 0, False])
        streams[st][0] += e - s
        streams[st][1] += 1
        streams[st][2] |= "nccl" in n.lower()
    by_stream = ", ".join(
        f"stream {st}{' (nccl)' if v[2] else ''} {per(v[0])} ms/{v[1] // steps}"
        for st, v in sorted(streams.items(), key=lambda kv: -kv[1][0])
    )
    return (
        f"{path}: window {per(window)} ms/step; device idle {per(window - busy)} "
        f"(gaps over 10 us {per(long_gaps([(s, e) for s, e, _, _ in kernels], 10.0))}); "
        f"other device work (kernels, copies) busy {per(union(rest))}; NCCL kernels {per(union(nccl))} "
        f"of which alone {per(alone(nccl, rest))}; per stream (ms/step, kernels/step): {by_stream}"
    )


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    steps = int(sys.argv[1])
    for p in sys.argv[2:]:
        print(summary(p, steps))


if __name__ == "__main__":
    main()
