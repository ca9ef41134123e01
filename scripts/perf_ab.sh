#!/usr/bin/env bash
# Side-by-side timing of two `fast` builds on one GPU, in one session (the perf log's method:
# compare only numbers taken on the same card in the same run), plus `verify --device cuda` of
# the new build.
#
# Usage: scripts/perf_ab.sh INPUT_DIR
#   INPUT_DIR/fast_old, INPUT_DIR/fast    the builds to compare (make release-cuda)
#   INPUT_DIR/verify                      the verify of the same make release-cuda (same sources as fast)
#   INPUT_DIR/poems_100k.jsonl.xz         corpus for real-data batches (scripts/build_corpus.sh)
# Variants: VARIANTS="name|binary|ENV=..|args" lines; defaults below. Prints one table row each.
set -uo pipefail
IN=$(cd "$1" && pwd)
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;d=os.path.dirname(torch.__file__);print(d+"/lib:"+d+"/../nvidia/cu13/lib")'):${LD_LIBRARY_PATH:-}
DATA=/tmp/perf_ab.jsonl
[ -f $DATA ] || xz -dc "$IN/poems_100k.jsonl.xz" >$DATA

for p in fp32 bf16; do
    "$IN/verify" --fixtures golden/minimind --path fast --device cuda --precision $p >/tmp/verify_$p.txt 2>&1
    echo "verify fast cuda $p: rc $?, $(tail -1 /tmp/verify_$p.txt)"
done

bench() {  # NAME BINARY ENV ARGS...
    local name=$1 bin=$2 envs=$3
    shift 3
    env $envs "$IN/$bin" bench --data-path $DATA --tokenizer golden/minimind --num-workers 12 "$@" \
        2>/tmp/bench_$name.err | python3 -c "
import json, sys
name = '$name'
try:
    j = json.loads(sys.stdin.read().strip().splitlines()[-1])
    m = j['peak_memory'] or {}
    print(f\"{name:34s} {j['step_ms']:7.2f} ms  {j['padded_tokens_per_s']/1e3:6.0f}k padded/s  {j['useful_tokens_per_s']/1e3:6.0f}k useful/s  \"
          f\"{100*j['ceiling_fraction']:5.1f}% of {j['matmul_ceiling_tflops']:.0f} TF  peak {m.get('allocated_gib', float('nan')):5.2f} GiB\")
except Exception as e:
    print(f'{name:34s} FAILED: {e}')
"
    grep -iE "error|panick" /tmp/bench_$name.err | head -3
}
echo "variant                            step      padded        useful       of ceiling     peak memory"
if [ -n "${VARIANTS:-}" ]; then
    # One "name|binary|ENV=..|args" per line.
    while IFS='|' read -r name bin envs args; do
        [ -n "$name" ] && bench "$name" "$bin" "$envs" $args
    done <<<"$VARIANTS"
    exit 0
fi
bench old_padded_b32_eager      fast_old "" --batch-size 32
bench new_padded_b32_eager      fast     "" --batch-size 32
bench old_padded_b32_graph      fast_old "" --batch-size 32 --cuda-graph
bench new_padded_b32_graph      fast     "" --batch-size 32 --cuda-graph
bench old_padded_b128_graph     fast_old "" --batch-size 128 --steps 30 --cuda-graph
bench new_padded_b128_graph     fast     "" --batch-size 128 --steps 30 --cuda-graph
bench new_b128_graph_unchunked  fast     "" --loss-chunk-rows 0 --batch-size 128 --steps 30 --cuda-graph
bench new_packed_b128_graph     fast     "" --batch-size 128 --steps 30 --cuda-graph --data-mode packed
bench new_packed_b192_graph     fast     "" --batch-size 192 --steps 20 --cuda-graph --data-mode packed
