#!/usr/bin/env bash
# Where the time goes (bench --profile): 26M packed-docs and packed b128, MiniMind-3 b128 and b32,
# minimind2-moe b128.
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a $S
M2=(--tokenizer minimind2 --cuda-graph)
prof() {
  local name=$1; shift
  bench $name "$@" --profile $O/prof_$name --profile-steps 3
  # The per-kernel table is on stderr: keep its top lines in the summary.
  python3 - $O/prof_$name/kernels.tsv <<'PY' | tee -a $S
import sys, csv
try:
    rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))
    head, body = rows[0], rows[1:]
    print("  columns:", head)
    for r in body[:22]: print("  ", " | ".join(c[:90] for c in r))
except Exception as e: print("  no kernels.tsv:", e)
PY
}
prof m2_packeddocs_b128 "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed-docs
prof m2_packed_b128     "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed
prof m3_b128 --model minimind3 --cuda-graph --batch-size 128 --steps 20
prof m3_b32  --model minimind3 --cuda-graph --batch-size 32 --steps 40
prof m2moe_b128 --model minimind2-moe --cuda-graph --batch-size 128 --steps 20
pack profile_speed_targets
