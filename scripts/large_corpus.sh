#!/usr/bin/env bash
# The large-corpus check of docs/performance.md ("Tokenizing a corpus, and starting on a large
# one"), on a CPU machine:
#
#   scripts/large_corpus.sh POEMS.jsonl DIR [GB]     # GB defaults to 10
#
# POEMS.jsonl is the poems corpus (scripts/build_corpus.sh). DIR gets `corpus.jsonl`: the poems
# repeated with a counter before each text (`{"text": "<i> <poem>"}`) up to GB * 1e9 bytes. Then:
# `fast tokenize` into the cache pretrain uses (rate, documents/s, peak RSS), and a 20-step tiny
# `fast pretrain` from that cache in padded and packed rows, each then resumed (`--from-resume 1`),
# with every output line timestamped from the command's start and its peak RSS. Needs a release
# build (`make pretrain` or `cargo build --release -p fast`) and GB * 1.7 GB of free disk.
set -uo pipefail
[ $# -ge 2 ] || { echo "usage: $0 POEMS.jsonl DIR [GB]" >&2; exit 2; }
poems=$(realpath "$1"); dir=$2; gb=${3:-10}
root=$(cd "$(dirname "$0")/.." && pwd)
fast=$root/target/release/fast
export LD_LIBRARY_PATH=$root/.venv/libtorch/lib:${LD_LIBRARY_PATH:-}
mkdir -p "$dir"; dir=$(realpath "$dir"); corpus=$dir/corpus.jsonl

if [ ! -f "$corpus" ]; then
  python3 - "$poems" "$corpus" "$gb" <<'EOF'
import json, sys
src = [json.loads(l)["text"] for l in open(sys.argv[1], encoding="utf-8")]
target, n, i = int(float(sys.argv[3]) * 1e9), 0, 0
with open(sys.argv[2], "w", encoding="utf-8") as f:
    while n < target:
        for t in src:
            line = json.dumps({"text": f"{i} {t}"}, ensure_ascii=False) + "\n"
            f.write(line); n += len(line.encode()); i += 1
            if n >= target:
                break
print(f"{i} documents, {n} bytes")
EOF
fi

# Each line of a command's output, prefixed with the seconds since $1.
stamped() { python3 -c '
import sys, time
t0 = float(sys.argv[1])
for line in sys.stdin:
    print(f"[{time.time() - t0:8.2f}s] {line}", end="", flush=True)' "$1"; }

/usr/bin/time -f "tokenize: peak RSS %M KB, %e s wall, %U s user, %S s sys" \
  "$fast" tokenize --data-path "$corpus" --tokenizer poems --no-progress

tiny=(--device cpu --data-path "$corpus" --hidden-size 32 --num-hidden-layers 1 --num-attention-heads 2
      --num-key-value-heads 1 --log-interval 1 --num-workers 2 --no-progress --sample-tokens 0 --save-interval 10)
for mode in padded packed; do
  run=$dir/run_$mode; rm -rf "$run"; mkdir -p "$run"
  for resume in 0 1; do
    extra=(--max-steps 20); [ $resume = 1 ] && extra=(--from-resume 1 --max-steps 30)
    t0=$(date +%s.%N)
    (cd "$run" && /usr/bin/time -f "peak RSS %M KB, %e s wall" "$fast" pretrain "${tiny[@]}" --data-mode $mode "${extra[@]}" 2>&1 \
       | stamped "$t0") >"$dir/first_${mode}_$resume.txt"
    echo "$mode, --from-resume $resume: first step $(grep -m1 -oE '^\[ *[0-9.]+s\] Epoch:\[[0-9/]+\]\([0-9]+' "$dir/first_${mode}_$resume.txt"); $(tail -1 "$dir/first_${mode}_$resume.txt")"
  done
done
