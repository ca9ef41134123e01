#!/usr/bin/env bash
# `fast pretrain --cuda-graph` against eager `fast pretrain` on one GPU: same seed, same data,
# so the loss curves must agree to bf16 round-off (the graphs replay the eager step's kernels on
# the same tensors; cuBLAS may choose another algorithm under replay), and the log's tokens/s
# shows what the graphs save. Needs only the `fast` binary (make release-cuda) and
# python3 with torch (for libtorch's shared libraries).
#
# Usage: scripts/graph_check.sh INPUT_DIR [STEPS]
#   INPUT_DIR/fast, INPUT_DIR/poems_100k.jsonl.xz (scripts/build_corpus.sh, xz-compressed)
set -uo pipefail
IN=$(cd "$1" && pwd)
STEPS=${2:-200}
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;d=os.path.dirname(torch.__file__);print(d+"/lib:"+d+"/../nvidia/cu13/lib")'):${LD_LIBRARY_PATH:-}
DATA=/tmp/graph_check.jsonl
[ -f $DATA ] || xz -dc "$IN/poems_100k.jsonl.xz" >$DATA
WORK=$(mktemp -d /tmp/graph_check.XXXXXX)
for B in 32 128; do
    for mode in eager graph; do
        extra=()
        [ $mode = graph ] && extra=(--cuda-graph)
        d=$WORK/b${B}_$mode
        mkdir -p $d
        (cd $d && "$IN/fast" pretrain --device cuda --data-path $DATA --tokenizer "$OLDPWD/golden/minimind" \
            --batch-size $B --accumulation-steps 1 --max-steps $STEPS --log-interval 10 --save-interval 1000000 \
            --sample-tokens 0 --no-progress --num-workers 12 "${extra[@]}") >$d/log.txt 2>&1 || { echo "b$B $mode failed:"; tail -5 $d/log.txt; }
    done
    python3 - $WORK/b${B}_eager $WORK/b${B}_graph $B <<'PY'
import json, statistics, sys, glob
def rows(d):
    return [json.loads(l) for l in open(glob.glob(d + "/**/metrics.jsonl", recursive=True)[0]) if l.strip()]
e, g = rows(sys.argv[1]), rows(sys.argv[2])
n = min(len(e), len(g))
rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(e[:n], g[:n])]
tps = lambda r: statistics.median(x["tokens_per_s"] for x in r[2:])
print(f"batch {sys.argv[3]}: {n} log lines; loss eager {e[n-1]['loss']:.4f} graph {g[n-1]['loss']:.4f}; "
      f"max rel diff {max(rel):.2e}; tok/s eager {tps(e)/1e3:.0f}k graph {tps(g)/1e3:.0f}k ({tps(g)/tps(e):.2f}x)")
PY
done
grep -h "captured" $WORK/*/log.txt | head -2
