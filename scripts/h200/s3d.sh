#!/usr/bin/env bash
# One epoch of MoE pretraining (the 26M config with MiniMind2's MoE, bf16, b128 x accum 2),
# grouped + --cuda-graph against the per-expert loop (eager), same seed; held-out loss of each by
# fast eval. DOCS=N (default 60000): the first N training poems (session 3, part D); DOCS=all:
# the whole training split (s4d.sh).
source "$(dirname "$0")/common.sh"
DOCS=${DOCS:-60000}
if [ "$DOCS" = all ]; then
  TRAIN=$W/train.jsonl
else
  TRAIN=$W/train_$DOCS.jsonl
  head -n $DOCS $W/train.jsonl >$TRAIN
fi
for e in grouped loop; do
  g=(); [ $e = grouped ] && g=(--cuda-graph)
  dir=$W/moe_$e; rm -rf $dir; mkdir -p $dir
  t0=$(stamp)
  (cd $dir && timeout 290 $FAST pretrain --device cuda --data-path $TRAIN --tokenizer minimind2 \
     --use-moe 1 --batch-size 128 --accumulation-steps 2 --log-interval 200 --num-workers 12 --no-progress \
     --sample-tokens 0 --moe-experts $e "${g[@]}") >$O/moe_$e.txt 2>&1
  row "moe pretrain $e: rc $?, $(took $t0)s wall; $(grep -E '^(done|stopped)' $O/moe_$e.txt | tail -1 | cut -c1-200)"
  grep -E 'Epoch' $O/moe_$e.txt | tail -2 | cut -c1-200 | tee -a $S
  wt=$(ls $dir/out/*.safetensors | head -1)
  timeout 60 $FAST eval --weights $wt --tokenizer ${wt%.safetensors}.tokenizer --data-path $W/heldout.jsonl --device cuda >$O/moe_eval_$e.txt 2>&1
  row "moe eval $e: rc $? $(tail -1 $O/moe_eval_$e.txt)"
done
pack d_$DOCS
