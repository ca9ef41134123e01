#!/usr/bin/env bash
# The token cache against the in-memory layout it replaced, on one H200 in one
# call: the tokenizing pass (16 cores) and pretrain tokens/s + data wait, padded b32 and packed b128.
# Needs .device/fast_old.xz (the build before the cache).
source "$(dirname "$0")/common.sh"
[ -x $W/fast_old ] || { xz -dc $D/fast_old.xz >$W/fast_old && chmod +x $W/fast_old; }
TOK=$D/minimind2/model
rm -rf $W/train.jsonl.tokens; t0=$(stamp)
$FAST tokenize --data-path $W/train.jsonl --tokenizer $TOK --no-progress >$O/tok.txt 2>&1
row "new tokenize (16 threads): rc $? $(took $t0)s: $(grep tokenized $O/tok.txt | cut -c1-230)"
for mode in "padded 32 400" "packed 128 200"; do
  set -- $mode
  for bin in old new; do
    exe=$FAST; [ $bin = old ] && exe=$W/fast_old
    dir=$W/cmp_${bin}_$1; rm -rf $dir; mkdir -p $dir; t0=$(stamp)
    (cd $dir && timeout 200 $exe pretrain --device cuda --data-path $W/train.jsonl --tokenizer $TOK --data-mode $1 \
       --batch-size $2 --accumulation-steps 1 --max-steps $3 --log-interval 100 --num-workers 12 --cuda-graph \
       --no-progress --sample-tokens 0) >$O/cmp_${bin}_$1.txt 2>&1
    row "$bin $1 b$2: rc $?, $(took $t0)s wall; $(grep -E '^data:' $O/cmp_${bin}_$1.txt | grep -oE '(laid out in [0-9.]+s|token cache)' | head -1)"
    grep -E 'Epoch' $O/cmp_${bin}_$1.txt | tail -2 | grep -oE '^Epoch:\[[0-9/]+\]\([0-9/]+\)|[0-9]+ tok/s \([0-9]+ useful\) \| data wait [0-9.]+%' | paste -sd' ' | tee -a $S
  done
done
pack token_cache_vs_memory
