# Sourced by the scripts of scripts/h200/: binaries, data split, helpers. Everything under $OUT comes back.
set -uo pipefail
export LD_LIBRARY_PATH=$(python3 -c 'import torch,os;d=os.path.dirname(torch.__file__);print(d+"/lib:"+d+"/../nvidia/cu13/lib")'):${LD_LIBRARY_PATH:-}
D=$(pwd)/.device
O=${OUT:-/tmp/out}
W=/tmp/w
mkdir -p $O $W
S=$O/summary.txt
touch $S
row() { echo "$*" | tee -a $S; }
stamp() { date +%s.%N; }
took() { python3 -c "print(f'{$(stamp) - $1:.1f}')"; }
# unpacked SRC DST: true when DST was unpacked from this SRC (same path, size and time) by an
# earlier call on a still-warm machine, so that a call with another build or data unpacks again.
unpacked() { [ -e "$2" ] && [ "$(cat "$2.from" 2>/dev/null)" = "$(stat -c '%n %s %Y' "$1")" ]; }
mark_unpacked() { stat -c '%n %s %Y' "$1" >"$2.from"; }
# BUILD=_D: the binaries of another build carried beside the prepared ones (.device/fast_D.xz,
# verify_D.xz).
for f in fast verify; do
  src=$D/$f${BUILD:-}.xz
  [ -f $src ] && ! unpacked $src $W/$f && xz -dc $src >$W/$f && chmod +x $W/$f && mark_unpacked $src $W/$f
done
# The poems (scripts/build_corpus.sh); DATA_XZ=another .jsonl.xz (a subset, for benches when the
# call's carry has no room for the whole corpus).
DATA_XZ=${DATA_XZ:-$D/poems_full.jsonl.xz}
if [ -f $DATA_XZ ] && ! unpacked $DATA_XZ $W/train.jsonl; then
  xz -dc $DATA_XZ >$W/full.jsonl
  head -n -2000 $W/full.jsonl >$W/train.jsonl
  tail -n 2000 $W/full.jsonl >$W/heldout.jsonl
  mark_unpacked $DATA_XZ $W/train.jsonl
fi
FAST=$W/fast
VERIFY=$W/verify

# moe_preset MODEL: MiniMind's source (MM), its trainer's model options (AH) and our tokenizer
# option (TK) for a MoE preset.
moe_preset() {
  case $1 in
    minimind2-moe) MM=$D/minimind2; AH=(--hidden 640 --layers 8 --moe 1); TK=(--tokenizer minimind2) ;;
    minimind3-moe) MM=$D/minimind3; AH=(--hidden 768 --layers 8 --moe 1); TK=() ;;
  esac
}

# moe_epoch EXPERTS LIMIT_S LOG_INTERVAL: one epoch of `--use-moe 1` (b128 x 2) on the training
# split with --moe-experts EXPERTS (grouped: with --cuda-graph), then fast eval on the held-out
# poems; summary rows.
moe_epoch() {
  local e=$1 lim=$2 every=$3 g=()
  [ $e = grouped ] && g=(--cuda-graph)
  local dir=$W/moe_$e
  rm -rf $dir; mkdir -p $dir
  local t0=$(stamp)
  (cd $dir && timeout $lim $FAST pretrain --device cuda --data-path $W/train.jsonl --tokenizer minimind2 \
     --use-moe 1 --batch-size 128 --accumulation-steps 2 --log-interval $every --num-workers 12 --no-progress \
     --sample-tokens 0 --moe-experts $e "${g[@]}") >$O/moe_$e.txt 2>&1
  row "moe pretrain $e (310k poems): rc $?, $(took $t0)s wall; $(grep -E '^(done|stopped)' $O/moe_$e.txt | tail -1 | cut -c1-200)"
  grep -E '^kernels' $O/moe_$e.txt | head -1 | cut -c1-250 | tee -a $S
  grep Epoch $O/moe_$e.txt | tail -1 | cut -c1-200 | tee -a $S
  local wt=$(ls $dir/out/*.safetensors 2>/dev/null | head -1)
  grep -qE '^done' $O/moe_$e.txt && [ -n "$wt" ] && timeout 40 $FAST eval --weights $wt --data-path $W/heldout.jsonl --device cuda >$O/moe_eval_$e.txt 2>&1 && row "moe eval $e: $(tail -1 $O/moe_eval_$e.txt)"
}

# verify_all "FOLDER PRECISION [VERIFY OPTIONS...]"...: verify --device cuda on golden/FOLDER, a
# summary row each.
verify_all() {
  for fp in "$@"; do
    set -- $fp
    local t0=$(stamp) tag=$(echo "$*" | tr ' ' '_' | tr -d -)
    timeout 150 $VERIFY --fixtures golden/$1 --path fast --device cuda --precision $2 "${@:3}" >$O/verify_$tag.txt 2>&1
    local rc=$?
    row "verify $*: rc $rc, $(grep -cE ' OK$' $O/verify_$tag.txt) OK, $(grep -c 'NOT OK' $O/verify_$tag.txt) NOT OK, $(took $t0)s"
    grep -E 'NOT OK|rror' $O/verify_$tag.txt | head -6 | cut -c1-200 | tee -a $S
  done
}

# kernels_all NAME LIMIT_S [KERNELS OPTIONS...]: fast kernels --device cuda into $O/NAME.txt, a
# summary row and the first failures.
kernels_all() {
  local name=$1 limit=$2; shift 2
  local t0=$(stamp)
  timeout $limit $FAST kernels --device cuda "$@" >$O/$name.txt 2>&1
  local rc=$?
  row "$name: rc $rc, $(grep -c ' ok' $O/$name.txt) ok, $(grep -c FAIL $O/$name.txt) FAIL, $(took $t0)s"
  grep -E 'FAIL|panicked|rror' $O/$name.txt | head -20 | cut -c1-220 | tee -a $S
}

# bench NAME ARGS...: one fast bench line (its JSON in $O/bench_NAME.json).
bench() {
  local name=$1; shift
  timeout 180 $FAST bench --data-path $W/train.jsonl --num-workers 12 "$@" >$O/bench_$name.json 2>$O/bench_$name.err
  local rc=$?
  python3 - "$name" "$rc" "$O/bench_$name.json" <<'EOF' | tee -a $S
import json, sys
name, rc, path = sys.argv[1:4]
try:
    j = json.loads(open(path).read().strip().splitlines()[-1])
    m = j.get("peak_memory") or {}
    print(f"bench {name:22s} {j['step_ms']:7.2f} ms  {j['padded_tokens_per_s']/1e3:6.0f}k padded  {j['useful_tokens_per_s']/1e3:6.0f}k useful  "
          f"{100*j['ceiling_fraction']:4.1f}% of {j['matmul_ceiling_tflops']:.0f} TFLOP/s  peak {m.get('allocated_gib', float('nan')):.2f} GiB  wait {100*j['data_wait_share']:.1f}%")
except Exception as e:
    print(f"bench {name:22s} FAILED rc {rc}: {e}")
EOF
}

# anchor NAME MINIMIND_DIR ARGS...: MiniMind's own trainer step (minimind_bench.py).
anchor() {
  local name=$1 mm=$2; shift 2
  timeout 300 python3 $D/minimind_bench.py $mm $W/train.jsonl --workers 12 "$@" >$O/anchor_$name.json 2>$O/anchor_$name.err
  local rc=$?
  python3 - "$name" "$rc" "$O/anchor_$name.json" <<'EOF' | tee -a $S
import json, sys
name, rc, path = sys.argv[1:4]
try:
    j = json.loads(open(path).read().strip().splitlines()[-1])
    print(f"anchor {name:21s} {j['step_ms']:7.2f} ms  {j['padded_tok_s']/1e3:6.0f}k padded  {j['useful_tok_s']/1e3:6.0f}k useful  "
          f"peak {j['peak_mem_GiB']:.2f} GiB  params {j['params_M']}M  compile {j['compile']}")
except Exception as e:
    print(f"anchor {name:21s} FAILED rc {rc}: {e}")
EOF
}

# timed_epoch NAME LIMIT_S ARGS...: one fast pretrain epoch of the training split (MiniMind's
# tokenizer, --cuda-graph, no --eval-data) in $W/NAME, timed as a whole command as a user runs
# it, then fast eval of its weights on the held-out poems; a summary row each.
timed_epoch() {
  local name=$1 lim=$2; shift 2
  local dir=$W/$name; rm -rf $dir; mkdir -p $dir
  local t0=$(stamp)
  (cd $dir && timeout $lim $FAST pretrain --device cuda --data-path $W/train.jsonl --tokenizer minimind2 \
     --cuda-graph --no-progress --num-workers 12 --sample-tokens 0 "$@") >$O/$name.txt 2>&1
  row "pretrain $name ($*): rc $?, $(took $t0)s wall (command); $(grep -E '^done' $O/$name.txt | cut -c1-160)"
  timeout 40 $FAST eval --weights $dir/out/pretrain_512.safetensors --data-path $W/heldout.jsonl --device cuda >$O/${name}_eval.txt 2>&1
  row "eval $name: rc $? $(tail -1 $O/${name}_eval.txt)"
}

# run NAME ARGS...: one fast pretrain in $W/run_NAME scored on the held-out poems during training.
run() {
  local name=$1; shift
  local dir=$W/run_$name
  rm -rf $dir; mkdir -p $dir
  t0=$(stamp)
  (cd $dir && timeout 280 $FAST pretrain --device cuda --data-path $W/train.jsonl \
     --eval-data $W/heldout.jsonl --eval-interval ${EVI:-400} --log-interval ${EVI:-400} --cuda-graph --no-progress \
     --num-workers 12 --sample-tokens 32 "$@") >$O/pretrain_$name.txt 2>&1
  rc=$?
  cp $dir/out/metrics.jsonl $O/metrics_$name.jsonl 2>/dev/null
  row "pretrain $name: rc $rc, $(took $t0)s wall (command); $(grep -E '^(done|stopped)' $O/pretrain_$name.txt | cut -c1-160)"
  grep -E 'held-out' $O/pretrain_$name.txt | tail -1 | grep -oE 'held-out [0-9.]+ [(][^)]*[)]' | tee -a $S
  grep -E '^optimizer:' $O/pretrain_$name.txt | cut -c1-200 | tee -a $S
}

# pack: the device brings back at most 8 files; everything but the summary goes in one tarball.
pack() {
  (cd $O && tar czf logs_${1:-x}.tar.gz $(ls | grep -vE '^(summary.txt|logs_.*\.tar\.gz)$') 2>/dev/null \
     && ls | grep -vE '^(summary.txt|logs_.*\.tar\.gz)$' | xargs rm -rf)
}
