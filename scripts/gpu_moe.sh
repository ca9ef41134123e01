#!/usr/bin/env bash
# MoE on one GPU (H200, PyTorch 2.11 installed): grouped experts against the per-expert loop.
# Needs no Rust: the binaries `make release-cuda` builds here (fast and verify, both with
# `--features cuda`), copied to .device/fast and .device/verify. Run from the repo root:
#
#   OUT=/some/dir scripts/gpu_moe.sh            # $OUT: where logs and summary.txt go
#
# Stages (STAGES="1 2 3" by default; 4 needs DATA):
#   1. fast kernels --only moe: both MoE variants at d 512, T 340, B 32 and 128 (+ a case whose
#      last expert gets no token), bf16 and fp32: grouped vs loop (output, aux, every gradient),
#      fwd+bwd times of the loop, grouped, grouped on pre-stacked weights; peak memory.
#   2. verify --path fast --device cuda on golden/minimind (moe_tiny) and golden/minimind3
#      (moe3_tiny, minimind3_moe_48.pth), fp32 and bf16, grouped (default) and --moe-experts loop.
#   3. fast bench, seq 340, bf16, batch 32 and 128, for each of $MODELS:
#        moe26m        --use-moe 1: the 26M config with MiniMind2's MoE (d 512, 4 routed top-2 +
#                      1 shared); MiniMind's anchor: minimind_bench.py MM2 DATA --moe 1 --batch B
#        minimind2-moe --model minimind2-moe (d 640); anchor: ... --hidden 640 --moe 1 --batch B
#        minimind3-moe --model minimind3-moe (d 768, 4 routed top-1); anchor: minimind_bench.py
#                      on the MiniMind-3 source with --hidden 768 --moe 1 --batch B
#      each as grouped + --cuda-graph, grouped eager, loop eager; and once loop + --cuda-graph,
#      which must be refused naming --moe-experts. One table line per run (step_ms, padded_tok_s,
#      peak_mem_GiB as minimind_bench.py prints them, and the final loss).
#      DATA=corpus.jsonl benches on real (padded) rows; without it, synthetic full rows.
#   4. (DATA needed) one epoch of MoE pretraining (26M MoE, bf16, b128 x accum 2) on DATA minus
#      its last 2,000 lines, grouped + --cuda-graph vs loop eager, same seed: wall times and the
#      held-out loss of each (fast eval on the 2,000 lines).
set -uo pipefail
REPO=$(pwd)
BIN=${BIN:-$REPO/.device}
FAST=$BIN/fast
VERIFY=$BIN/verify
OUT=${OUT:?set OUT to the output directory}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
STAGES=${STAGES:-1 2 3}
MODELS=${MODELS:-moe26m minimind2-moe minimind3-moe}
BATCHES=${BATCHES:-32 128}
DATA=${DATA:-}
want() { [[ " $STAGES " == *" $1 "* ]]; }
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;d=os.path.dirname(torch.__file__);print(d+"/lib:"+d+"/../nvidia/cu13/lib")'):${LD_LIBRARY_PATH:-}
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
row() { echo "$*" | tee -a "$SUMMARY"; }
stamp() { date +%s.%N; }
took() { python3 -c "print(f'{$(stamp) - $1:.1f}')"; }
nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv >"$OUT/nvidia_smi.txt" 2>&1
row "gpu: $(tail -1 "$OUT/nvidia_smi.txt")"

if want 1; then
    t0=$(stamp)
    $FAST kernels --device cuda --only moe --iters 20 --warmup 3 >"$OUT/kernels_moe.txt" 2>&1
    rc=$?
    row "kernels --only moe: rc $rc, $(grep -c ' ok' "$OUT/kernels_moe.txt") ok, $(grep -c 'FAIL' "$OUT/kernels_moe.txt") FAIL ($(took $t0)s)"
    grep -E 'FAIL| grouped [0-9.]+ ms' "$OUT/kernels_moe.txt" | tee -a "$SUMMARY"
fi

if want 2; then
    for dir in golden/minimind golden/minimind3; do
        for p in fp32 bf16; do
            for e in grouped loop; do
                t0=$(stamp)
                log=$OUT/verify_$(basename $dir)_${p}_$e.txt
                $VERIFY --fixtures $dir --path fast --device cuda --precision $p --moe-experts $e >"$log" 2>&1
                rc=$?
                # Rows end in "  OK" or "  NOT OK".
                moe=$(grep -cE '^(moe_tiny|moe3_tiny|minimind3_moe_48) .*  OK$' "$log")
                row "verify $dir $p $e: rc $rc, $(grep -c '  OK$' "$log") OK ($moe MoE rows), $(grep -c 'NOT OK' "$log") NOT OK ($(took $t0)s)"
                grep 'NOT OK' "$log" | head -5 | tee -a "$SUMMARY"
            done
        done
    done
fi

model_args() {
    case $1 in
        moe26m) echo "--use-moe 1 --tokenizer golden/minimind" ;;
        *) echo "--model $1" ;;
    esac
}

if want 3; then
    D=()
    [ -n "$DATA" ] && D=(--data-path "$DATA" --num-workers 12)
    row "$(printf '%-14s %5s %-8s %-6s %9s %13s %13s %9s' model batch experts graph step_ms padded_tok_s peak_mem_GiB loss)"
    bench() {
        local model=$1 b=$2 experts=$3 graph=$4
        local name=${model}_b${b}_${experts}_${graph}
        local g=()
        [ "$graph" = graph ] && g=(--cuda-graph)
        local steps=50
        [ "$b" -ge 128 ] && steps=30
        # shellcheck disable=SC2046
        $FAST bench "${D[@]}" $(model_args "$model") --batch-size "$b" --max-seq-len 340 \
            --dtype bfloat16 --moe-experts "$experts" --steps $steps "${g[@]}" \
            >"$OUT/bench_$name.json" 2>"$OUT/bench_$name.err"
        local rc=$?
        python3 - "$model" "$b" "$experts" "$graph" "$rc" "$OUT/bench_$name.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
model, b, experts, graph, rc, path = sys.argv[1:]
try:
    j = json.loads(open(path).read().strip().splitlines()[-1])
    m = j["peak_memory"] or {}
    print(f"{model:14s} {b:>5s} {experts:8s} {graph:6s} {j['step_ms']:9.2f} {j['padded_tokens_per_s']:13.0f} "
          f"{m.get('allocated_gib', float('nan')):13.2f} {j['final_loss']:9.4f}")
except Exception as e:
    print(f"{model:14s} {b:>5s} {experts:8s} {graph:6s} FAILED rc {rc}: {e}")
EOF
        [ $rc -ne 0 ] && tail -3 "$OUT/bench_$name.err" | tee -a "$SUMMARY"
    }
    for model in $MODELS; do
        for b in $BATCHES; do
            bench "$model" "$b" grouped graph
            bench "$model" "$b" grouped eager
            bench "$model" "$b" loop eager
        done
    done
    # The loop cannot be captured: the refusal must name the option.
    first=${MODELS%% *}
    # shellcheck disable=SC2046
    $FAST bench $(model_args "$first") --batch-size 4 --steps 1 --warmup 1 --moe-experts loop \
        --cuda-graph >"$OUT/bench_loop_graph.json" 2>"$OUT/bench_loop_graph.err"
    rc=$?
    if [ $rc -ne 0 ] && grep -q -- '--moe-experts' "$OUT/bench_loop_graph.err"; then
        row "loop + --cuda-graph refused (rc $rc): $(grep -- '--cuda-graph' "$OUT/bench_loop_graph.err" | tail -1)"
    else
        row "loop + --cuda-graph NOT refused as expected (rc $rc): $(tail -1 "$OUT/bench_loop_graph.err")"
    fi
fi

if want 4; then
    if [ -z "$DATA" ]; then
        row "stage 4 needs DATA=corpus.jsonl"
    else
        W=/tmp/gpu_moe
        mkdir -p $W
        head -n -2000 "$DATA" >$W/train.jsonl
        tail -n 2000 "$DATA" >$W/heldout.jsonl
        for e in grouped loop; do
            g=()
            [ $e = grouped ] && g=(--cuda-graph)
            t0=$(stamp)
            (cd $W && timeout -s TERM ${PRETRAIN_LIMIT:-540} $FAST pretrain --device cuda --data-path $W/train.jsonl \
                --use-moe 1 --batch-size 128 --accumulation-steps 2 --epochs 1 --log-interval 100 \
                --save-interval 100000 --num-workers 12 --tokenizer golden/minimind --no-progress \
                --moe-experts $e "${g[@]}" --save-dir $W/out_$e --checkpoint-dir $W/ck_$e) \
                >"$OUT/pretrain_$e.txt" 2>&1
            rc=$?
            row "pretrain $e: rc $rc, $(took $t0)s wall; $(grep -E '^(done|stopped)' "$OUT/pretrain_$e.txt" | tail -1)"
            wts=$(ls $W/out_$e/*.safetensors 2>/dev/null | head -1)
            if [ -n "$wts" ]; then
                $FAST eval --weights "$wts" --data-path $W/heldout.jsonl --tokenizer golden/minimind \
                    --device cuda >"$OUT/eval_$e.txt" 2>&1
                row "eval held-out $e: $(tail -1 "$OUT/eval_$e.txt")"
            fi
        done
    fi
fi

# The device tool brings back a few files only: pack the logs.
(cd "$OUT" && tar czf logs.tar.gz $(ls | grep -vE '^(summary.txt|logs.tar.gz)$') \
    && ls | grep -vE '^(summary.txt|logs.tar.gz)$' | xargs rm -f)
echo "==== summary"
cat "$SUMMARY"
