#!/usr/bin/env python3
"""Table of fast-vs-reference ratios from criterion's results (target/criterion).

    cargo bench --bench fast_vs_reference && python3 scripts/bench_table.py

Benchmarks are named component/size/path (path: reference, fast, fast_per_tensor). Each row gives
the median time of every path and reference / fast: how many times faster the fast path is on the
same inputs, measured side by side in one `cargo bench` run.
"""
import json
import pathlib
import sys

root = pathlib.Path(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
times = {}
for est in root.glob("*/new/estimates.json"):
    # criterion flattens "/" in directory names; benchmark.json keeps the full id.
    name = json.loads((est.parent / "benchmark.json").read_text())["full_id"]
    parts = name.split("/")
    if len(parts) != 3:
        continue
    comp, size, path = parts
    times.setdefault((comp, size), {})[path] = json.loads(est.read_text())["median"]["point_estimate"]
if not times:
    sys.exit(f"no criterion results under {root}")


def fmt(ns):
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("us", 1e3)):
        if ns >= scale:
            return f"{ns / scale:.2f} {unit}"
    return f"{ns:.0f} ns"


print("| component | size | reference (f64, ndarray) | fast (fp32, libtorch CPU) | reference / fast |")
print("|---|---|---|---|---|")
for (comp, size), p in sorted(times.items(), key=lambda kv: (kv[0][0], kv[0][1] != "tiny")):
    ref, fast = p.get("reference"), p.get("fast")
    ratio = f"{ref / fast:.1f}x" if ref and fast else "-"
    extra = f" (per-tensor: {fmt(p['fast_per_tensor'])})" if "fast_per_tensor" in p else ""
    print(f"| {comp} | {size} | {fmt(ref) if ref else '-'} | {fmt(fast) if fast else '-'}{extra} | {ratio} |")
