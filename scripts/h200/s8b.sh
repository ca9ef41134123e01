#!/usr/bin/env bash
# One epoch of the 306k training poems with the packed-docs recipe and with MiniMind's padded
# recipe, each timed as a whole command (no --eval-data), then fast eval of both on the held-out
# poems; the same binary, one call.
source "$(dirname "$0")/common.sh"
epoch() {
  local name=$1 lim=$2; shift 2
  local dir=$W/$name; rm -rf $dir; mkdir -p $dir
  local t0=$(stamp)
  (cd $dir && timeout $lim $FAST pretrain --device cuda --data-path $W/train.jsonl --tokenizer minimind2 \
     --cuda-graph --no-progress --num-workers 12 --sample-tokens 0 "$@") >$O/$name.txt 2>&1
  row "pretrain $name ($*): rc $?, $(took $t0)s wall (command); $(grep -E '^done' $O/$name.txt | cut -c1-160)"
  timeout 40 $FAST eval --weights $dir/out/pretrain_512.safetensors --data-path $W/heldout.jsonl --device cuda >$O/${name}_eval.txt 2>&1
  row "eval $name: rc $? $(tail -1 $O/${name}_eval.txt)"
}
epoch packed_docs 60 --data-mode packed-docs --batch-size 32 --accumulation-steps 2
epoch padded 150
pack s8b
echo "==== summary"
cat $S
