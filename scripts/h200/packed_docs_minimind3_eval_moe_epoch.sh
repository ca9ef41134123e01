#!/usr/bin/env bash
# One epoch of the packed-docs recipe timed as a whole command, then fast eval of a MiniMind-3
# checkpoint on CUDA (bf16 weights through our
# attention with q/k norm), then one epoch of MoE pretraining on the whole poems corpus (the 26M
# config with MiniMind2's MoE, b128 x 2), grouped + --cuda-graph against the per-expert loop.
source "$(dirname "$0")/common.sh"
# The packed-docs recipe as a user runs it (no --eval-data), timed as a whole, then fast eval.
timed_epoch pd 60 --data-mode packed-docs --batch-size 32 --accumulation-steps 2
dir=$W/m3short; rm -rf $dir; mkdir -p $dir
(cd $dir && timeout 60 $FAST pretrain --device cuda --data-path $W/heldout.jsonl --model minimind3 --cuda-graph \
   --max-steps 100 --batch-size 32 --accumulation-steps 1 --no-progress --sample-tokens 0 --log-interval 50) >$O/m3short.txt 2>&1
row "m3 short pretrain: rc $?"
WT=$(ls $dir/out/*.safetensors | head -1)
timeout 60 $FAST eval --weights $WT --data-path $W/heldout.jsonl --device cuda >$O/eval_m3.txt 2>&1
row "eval m3 (no --tokenizer: the recorded one): rc $? $(tail -1 $O/eval_m3.txt)"
moe_epoch grouped 230 200
moe_epoch loop ${LOOP_LIMIT:-250} 200
pack packed_docs_minimind3_eval_moe_epoch
echo "==== summary"
cat $S
