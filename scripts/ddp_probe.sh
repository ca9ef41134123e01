#!/usr/bin/env bash
# Where an NP-GPU data-parallel step's time goes at batch 32 per GPU: variants of ddp_check.sh's
# scaling run, each printed as the median tokens/s over log intervals of 30 steps (300 steps, --cuda-graph, bf16, token-weighted loss).
# `pair` runs two independent one-GPU runs at once, one per card, without NCCL: what a busy
# neighbour costs. `profile` profiles micro-steps 100-104 of a 1-GPU and an NP-GPU run
# (`pretrain --profile`) and prints scripts/trace_summary.py's line for each.
#
# Usage: [NP=2] [PROBES="1gpu ngpu ..."] scripts/ddp_probe.sh INPUT_DIR
#   (INPUT_DIR/fast: make release-cuda; INPUT_DIR/data.jsonl)
set -uo pipefail
IN=$(cd "$1" && pwd)
BIN=$IN/fast
W=$(mktemp -d /tmp/ddp_probe.XXXXXX)
TORCH_LIB=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH="$TORCH_LIB:$TORCH_LIB/../../nvidia/cu13/lib:${LD_LIBRARY_PATH:-}"
export NCCL_NVLS_ENABLE=0
NP=${NP:-2}
PROBES=${PROBES:-1gpu ngpu no_overlap rank_mean bucket1 bucket3 ch8 ch16 simple pair profile}
want() { [[ " $PROBES " == *" $1 "* ]]; }
HERE=$(cd "$(dirname "$0")" && pwd)
TR=(python3 -m torch.distributed.run --standalone --nproc_per_node "$NP" --no-python)
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
want 1gpu && go 1gpu 1 ""
want ngpu && go ${NP}gpu "$NP" ""
want no_overlap && go ${NP}gpu_no_overlap "$NP" "" --dp-overlap off
want rank_mean && go ${NP}gpu_rank_mean "$NP" "" --loss-normalization mean
want bucket1 && go ${NP}gpu_bucket1 "$NP" "" --dp-bucket-layers 1
want bucket3 && go ${NP}gpu_bucket3 "$NP" "" --dp-bucket-layers 3
want ch8 && go ${NP}gpu_nccl_ch8 "$NP" "NCCL_MAX_NCHANNELS=8"
want ch16 && go ${NP}gpu_nccl_ch16 "$NP" "NCCL_MAX_NCHANNELS=16"
want simple && go ${NP}gpu_nccl_simple "$NP" "NCCL_PROTO=Simple"
if want pair; then
    for g in 0 1; do
        mkdir -p "$W/pair$g"
        (cd "$W/pair$g" && CUDA_VISIBLE_DEVICES=$g timeout 150 "$BIN" pretrain "${C[@]}" \
            --save-dir "$W/pair$g/out" --checkpoint-dir "$W/pair$g/ck" >log.txt 2>&1) &
    done
    wait
    echo "pair, GPU 0 (while GPU 1 runs too): $(tp pair0)"
    echo "pair, GPU 1 (while GPU 0 runs too): $(tp pair1)"
fi
if want profile; then
    P=(--profile-at 100 --profile-steps 5)
    go prof_1gpu 1 "" --profile "$W/prof_1gpu/prof" "${P[@]}"
    go prof_${NP}gpu "$NP" "" --profile "$W/prof_${NP}gpu/prof" "${P[@]}"
    python3 "$HERE/trace_summary.py" 5 "$W"/prof_*/prof/rank0/trace.json
fi
echo "logs: $W"
