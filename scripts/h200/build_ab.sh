#!/usr/bin/env bash
# This build against an earlier one (BEFORE=.device/fast_X.xz) in one call: verify --device cuda
# and fast kernels --only ops with this build, the 26M packed-docs b128 and MiniMind-3 b32 benches
# of both builds side by side (twice each), and a short graphed pretrain of this build.
source "$(dirname "$0")/common.sh"
xz -dc ${BEFORE:?BEFORE=.device/fast_X.xz} > $W/fast_before && chmod +x $W/fast_before
NEW=$W/fast
verify_all "minimind bf16" "minimind fp32" "minimind3 bf16" "minimind3 fp32"
kernels_all kernels_ops 240 --only ops
PD=(--tokenizer minimind2 --cuda-graph --batch-size 128 --steps 30 --data-mode packed-docs)
for round in 1 2; do
  for side in before new; do
    [ $side = before ] && FAST=$W/fast_before || FAST=$NEW
    bench ${side}_pd_b128_$round "${PD[@]}"
    bench ${side}_m3_b32_$round --model minimind3 --cuda-graph --batch-size 32 --steps 40
  done
done
FAST=$NEW
dir=$W/short; rm -rf $dir; mkdir -p $dir
t0=$(stamp)
(cd $dir && timeout 120 $FAST pretrain --device cuda --data-path $W/train.jsonl --tokenizer minimind2 --cuda-graph \
   --data-mode packed-docs --batch-size 32 --accumulation-steps 2 --max-steps 600 --log-interval 200 \
   --no-progress --num-workers 12 --sample-tokens 24) >$O/short.txt 2>&1
row "pretrain short (600 micro-steps, packed-docs b32 x 2): rc $?, $(took $t0)s; $(grep -E '^(done|stopped)' $O/short.txt | cut -c1-160)"
grep -E 'Epoch' $O/short.txt | tail -1 | cut -c1-200 | tee -a $S
grep -E '^sample' $O/short.txt | head -2 | cut -c1-120 | tee -a $S
pack build_ab
echo "==== summary"
cat $S
