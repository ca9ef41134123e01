#!/usr/bin/env bash
# One epoch of MoE pretraining on the whole poems corpus (the 26M config with MiniMind2's MoE,
# b128 x 2, same seed): grouped experts with --cuda-graph and the default --moe-recompute swiglu,
# then the per-expert loop (eager), each scored by fast eval on the held-out poems.
source "$(dirname "$0")/common.sh"
# A second build carried beside the prepared one as .device/fast_D.xz replaces it.
for f in fast verify; do [ -f $D/${f}_D.xz ] && xz -dc $D/${f}_D.xz >$W/$f && chmod +x $W/$f; done
for e in grouped loop; do
  g=(); [ $e = grouped ] && g=(--cuda-graph)
  lim=200; [ $e = loop ] && lim=260
  dir=$W/moe_$e; rm -rf $dir; mkdir -p $dir
  t0=$(stamp)
  (cd $dir && timeout $lim $FAST pretrain --device cuda --data-path $W/train.jsonl --tokenizer minimind2 \
     --use-moe 1 --batch-size 128 --accumulation-steps 2 --log-interval 400 --num-workers 12 --no-progress \
     --sample-tokens 0 --moe-experts $e "${g[@]}") >$O/moe_$e.txt 2>&1
  row "moe pretrain $e (306k poems): rc $?, $(took $t0)s wall; $(grep -E '^(done|stopped)' $O/moe_$e.txt | tail -1 | cut -c1-200)"
  grep -E '^kernels' $O/moe_$e.txt | head -1 | cut -c1-250 | tee -a $S
  grep Epoch $O/moe_$e.txt | tail -1 | cut -c1-200 | tee -a $S
  wt=$(ls $dir/out/*.safetensors 2>/dev/null | head -1)
  grep -qE '^done' $O/moe_$e.txt && [ -n "$wt" ] && timeout 30 $FAST eval --weights $wt --data-path $W/heldout.jsonl --device cuda >$O/moe_eval_$e.txt 2>&1 && row "moe eval $e: $(tail -1 $O/moe_eval_$e.txt)"
done
pack s6d
echo "==== summary"
cat $S
