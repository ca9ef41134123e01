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


def union(intervals):
    """Total length of the union of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    if cur_e is not None:
        total += cur_e - cur_s
    return total


def long_gaps(intervals, over):
    """Total length of the gaps longer than `over` between the union of the intervals."""
    total, end = 0.0, None
    for s, e in sorted(intervals):
        if end is not None and s - end > over:
            total += s - end
        end = e if end is None else max(end, e)
    return total


def alone(target, others):
    """Length of the parts of `target` intervals covered by no interval of `others`."""
    merged = []
    for s, e in sorted(others):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    out, j = 0.0, 0
    for s, e in sorted(target):
        cov = 0.0
        while j < len(merged) and merged[j][1] <= s:
            j += 1
        k = j
        while k < len(merged) and merged[k][0] < e:
            cov += min(e, merged[k][1]) - max(s, merged[k][0])
            k += 1
        out += (e - s) - cov
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
