#!/usr/bin/env bash
# Single-GPU checks on a machine with PyTorch 2.11 and one CUDA GPU (nvidia-h100-x1). Needs no
# Rust: only the binaries `make release-cuda` builds here (target/release/fast and verify, both
# with `--features cuda`, so that verify --device cuda reaches the fused kernels).
#
# Usage: scripts/gpu_check.sh INPUT_DIR OUT_DIR
#   INPUT_DIR/fast, INPUT_DIR/verify      the binaries
#   INPUT_DIR/poems_full.jsonl.xz         the full poems corpus (scripts/build_corpus.sh), xz'd
# Runs, logging each under OUT_DIR, then prints a table:
#   1. fast doctor
#   2. verify --path fast --device cuda, fp32 and bf16, on golden/minimind
#   3. fast bench: 26M, seq 340, bf16, MiniMind's tokenizer, padded b32/b128 and packed b128,
#      eager and CUDA graph
#   4. fast pretrain: one epoch of the full corpus minus 2,000 held-out poems (26M, bf16,
#      batch 128 x accumulation 2 = MiniMind's 256 rows per optimizer step)
#   5. fast eval on the held-out poems, fast generate from the trained weights
# STAGES="1 2 3 4 5" (default) picks stages.
set -uo pipefail
REPO=$(pwd)
TOKDIR=$REPO/data/tokenizer
IN=$(cd "$1" && pwd)
OUT=$(mkdir -p "$2" && cd "$2" && pwd)
STAGES=${STAGES:-1 2 3 4 5}
want() { [[ " $STAGES " == *" $1 "* ]]; }
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;d=os.path.dirname(torch.__file__);print(d+"/lib:"+d+"/../nvidia/cu13/lib")'):${LD_LIBRARY_PATH:-}
FAST=$IN/fast
VERIFY=$IN/verify
WORK=/tmp/gpu_check
mkdir -p $WORK
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"
row() { echo "$*" | tee -a "$SUMMARY"; }
stamp() { date +%s.%N; }
took() { python3 -c "print(f'{$(stamp) - $1:.1f}')"; }

if [ -f "$IN/poems_full.jsonl.xz" ] && [ ! -f $WORK/poems_full.jsonl ]; then
    xz -dc "$IN/poems_full.jsonl.xz" >$WORK/poems_full.jsonl
    head -n -2000 $WORK/poems_full.jsonl >$WORK/train.jsonl
    tail -n 2000 $WORK/poems_full.jsonl >$WORK/heldout.jsonl
fi

nvidia-smi --query-gpu=name,memory.used,memory.total,utilization.gpu,clocks.sm,power.draw --format=csv >$OUT/nvidia_smi.txt 2>&1
if want 1; then
    $FAST doctor 2>&1 | tee $OUT/doctor.txt
    row "doctor: $(grep -c 'TFLOP/s' $OUT/doctor.txt) device measurements, $(grep -o 'matmul.*' $OUT/doctor.txt | head -1)"
fi

if want 2; then
    for p in fp32 bf16; do
        t0=$(stamp)
        $VERIFY --fixtures golden/minimind --path fast --device cuda --precision $p >$OUT/verify_$p.txt 2>&1
        rc=$?
        row "verify fast cuda $p: rc $rc, $(grep -c ' OK' $OUT/verify_$p.txt) rows OK, $(grep -c 'FAIL' $OUT/verify_$p.txt) FAIL ($(took $t0)s)"
    done
fi

if want 3; then
    B=(--data-path $WORK/train.jsonl --tokenizer golden/minimind --num-workers 12)
    bench() {
        local name=$1; shift
        $FAST bench "${B[@]}" "$@" >$OUT/bench_$name.json 2>$OUT/bench_$name.err
        local rc=$?
        python3 - "$name" "$rc" "$OUT/bench_$name.json" <<'EOF' | tee -a "$SUMMARY"
import json, sys
name, rc, path = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    j = json.loads(open(path).read().strip().splitlines()[-1])
    m = j["peak_memory"] or {}
    print(f"bench {name:18s} {j['step_ms']:7.2f} ms/step  {j['padded_tokens_per_s']/1e3:8.0f}k padded tok/s  "
          f"{j['useful_tokens_per_s']/1e3:8.0f}k useful  {100*j['ceiling_fraction']:5.1f}% of {j['matmul_ceiling_tflops']:.0f} TFLOP/s  "
          f"peak {m.get('allocated_gib', float('nan')):.2f} GiB  wait {100*j['data_wait_share']:.1f}%")
except Exception as e:
    print(f"bench {name:18s} FAILED rc {rc}: {e}")
EOF
        tail -3 $OUT/bench_$name.err
    }
    bench padded_b32_eager  --batch-size 32
    bench padded_b32_graph  --batch-size 32 --cuda-graph
    bench padded_b128_eager --batch-size 128 --steps 30
    bench padded_b128_graph --batch-size 128 --steps 30 --cuda-graph
    bench packed_b128_graph --batch-size 128 --steps 30 --cuda-graph --data-mode packed
    bench packed_b64_graph  --batch-size 64 --steps 30 --cuda-graph --data-mode packed
fi

if want 4; then
    t0=$(stamp)
    # SIGTERM at the time limit: the run saves a resume checkpoint and exits 143.
    (cd $WORK && timeout -s TERM ${PRETRAIN_LIMIT:-360} $FAST pretrain --device cuda --data-path $WORK/train.jsonl --batch-size 128 \
        --accumulation-steps 2 --epochs 1 --log-interval 100 --save-interval 500 --num-workers 12 \
        --tokenizer $TOKDIR --no-progress --save-dir $WORK/out --checkpoint-dir $WORK/checkpoints) >$OUT/pretrain.txt 2>&1
    rc=$?
    row "pretrain: rc $rc, $(took $t0)s wall; $(grep -E '^(done|stopped)' $OUT/pretrain.txt) $(tail -1 $OUT/pretrain.txt)"
    grep -E '^(data|model|training):' $OUT/pretrain.txt | tee -a "$SUMMARY"
    grep -E '^Epoch' $OUT/pretrain.txt | sed -n '1p;$p' | tee -a "$SUMMARY"
    grep -E '^sample' $OUT/pretrain.txt | tee -a "$SUMMARY"
    cp $WORK/out/metrics.jsonl $OUT/ 2>/dev/null
    cp $WORK/out/loss_curve.svg $OUT/ 2>/dev/null
fi

if want 5; then
    W=$(ls $WORK/out/*.safetensors 2>/dev/null | head -1)
    if [ -n "$W" ]; then
        $FAST eval --weights "$W" --data-path $WORK/heldout.jsonl --tokenizer $TOKDIR --device cuda >$OUT/eval.txt 2>&1
        row "eval held-out: $(tail -1 $OUT/eval.txt)"
        for prompt in 春 月 江 山; do
            $FAST generate --weights "$W" --tokenizer $TOKDIR --device cuda --prompt "$prompt" --max-new-tokens 64 \
                --temperature 0.8 --top-p 0.9 --seed 1 >>$OUT/generate.txt 2>&1
            echo >>$OUT/generate.txt
        done
        row "generate: $(head -c 600 $OUT/generate.txt | tr '\n' ' ')"
    else
        row "eval/generate: no weights in $WORK/out"
    fi
fi
# The device tool brings back at most 8 files: pack the logs.
(cd "$OUT" && tar czf logs.tar.gz $(ls | grep -vE '^(summary.txt|metrics.jsonl|loss_curve.svg|logs.tar.gz)$') \
    && ls | grep -vE '^(summary.txt|metrics.jsonl|loss_curve.svg|logs.tar.gz)$' | xargs rm -f)
echo "==== summary"
cat "$SUMMARY"
