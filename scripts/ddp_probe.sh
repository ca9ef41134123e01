#!/usr/bin/env bash
# Where a 2-GPU data-parallel step's time goes at batch 32 per GPU (docs/gpu-runs.md, third
# session): variants of ddp_check.sh's scaling run, each printed as the median tokens/s over log
# intervals of 30 steps (300 steps, --cuda-graph, bf16, token-weighted loss). Ends with two
# independent one-GPU runs at once, one per card, without NCCL: what a busy neighbour costs.
#
# Usage: scripts/ddp_probe.sh INPUT_DIR   (INPUT_DIR/fast: make release-cuda; INPUT_DIR/data.jsonl)
set -uo pipefail
IN=$(cd "$1" && pwd)
BIN=$IN/fast
W=$(mktemp -d /tmp/ddp_probe.XXXXXX)
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB:$TORCH_LIB/../../nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
TR=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 --no-python)
C=(--device cuda --dtype bfloat16 --accumulation-steps 1 --seed 42 --save-interval 1000000
   --sample-tokens 0 --no-progress --data-path "$IN/data.jsonl" --cuda-graph --batch-size 32
   --epochs 100 --max-steps 300 --log-interval 30)
tp() {  # NAME: median tokens/s, leaving out the first two intervals and those after an epoch end
    python3 - "$(find "$W/$1" -name metrics.jsonl | head -1)" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
clean = [r["tokens_per_s"] for i, r in enumerate(rows) if i >= 2 and rows[i - 1]["epoch"] == r["epoch"]]
print(f"{statistics.median(clean)/1e3:.0f}k tok/s (median of {len(clean)})")
PY
}
go() {  # NAME NPROC "ENV=.. ENV=.." ARGS...
    local n=$1 np=$2 envs=$3
    shift 3
    mkdir -p "$W/$n"
    local cmd=("$BIN")
    [ "$np" -gt 1 ] && cmd=("${TR[@]}" "$BIN")
    if (cd "$W/$n" && env $envs timeout 150 "${cmd[@]}" pretrain "${C[@]}" --save-dir "$W/$n/out" \
            --checkpoint-dir "$W/$n/ck" "$@" >log.txt 2>&1); then
        echo "$n: $(tp "$n")"
    else
        echo "$n FAILED"
        tail -5 "$W/$n/log.txt"
    fi
}
go 1gpu 1 ""
go 2gpu 2 ""
go 2gpu_no_overlap 2 "MM_DP_OVERLAP=0"
go 2gpu_rank_mean 2 "" --loss-normalization mean
go 2gpu_bucket1 2 "MM_DP_BUCKET_LAYERS=1"
go 2gpu_bucket3 2 "MM_DP_BUCKET_LAYERS=3"
go 2gpu_nccl_ch8 2 "NCCL_MAX_NCHANNELS=8"
go 2gpu_nccl_ch16 2 "NCCL_MAX_NCHANNELS=16"
go 2gpu_nccl_simple 2 "NCCL_PROTO=Simple"
for g in 0 1; do
    mkdir -p "$W/pair$g"
    (cd "$W/pair$g" && CUDA_VISIBLE_DEVICES=$g timeout 150 "$BIN" pretrain "${C[@]}" \
        --save-dir "$W/pair$g/out" --checkpoint-dir "$W/pair$g/ck" >log.txt 2>&1) &
done
wait
echo "pair, GPU 0 (while GPU 1 runs too): $(tp pair0)"
echo "pair, GPU 1 (while GPU 0 runs too): $(tp pair1)"
echo "logs: $W"
