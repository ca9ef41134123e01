#!/usr/bin/env bash
# MoE presets, ours (grouped experts, --cuda-graph; the per-expert loop eager
# for reference) beside MiniMind's own trainer (eager and torch.compile), seq 340, batch 32 and 128.
# MODEL=minimind2-moe|minimind3-moe
source "$(dirname "$0")/common.sh"
case ${MODEL:?} in
  minimind2-moe) MM=$D/minimind2; AH=(--hidden 640 --layers 8 --moe 1); TK=(--tokenizer minimind2) ;;
  minimind3-moe) MM=$D/minimind3; AH=(--hidden 768 --layers 8 --moe 1); TK=() ;;
esac
bench ${MODEL}_b32        --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 50
bench ${MODEL}_b128       --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 30
bench ${MODEL}_b32_loop   --model $MODEL "${TK[@]}" --moe-experts loop --batch-size 32 --steps 20
anchor ${MODEL}_b32_eager    $MM "${AH[@]}" --batch 32 --steps 40 --warmup 10
anchor ${MODEL}_b128_eager   $MM "${AH[@]}" --batch 128 --steps 20 --warmup 5
anchor ${MODEL}_b32_compile  $MM "${AH[@]}" --batch 32 --steps 40 --warmup 15 --compile
anchor ${MODEL}_b128_compile $MM "${AH[@]}" --batch 128 --steps 20 --warmup 10 --compile
for f in $O/anchor_*.err; do grep -iE 'error|warn|break' $f | tail -3 | cut -c1-200 | tee -a $S; done
bench ${MODEL}_b32_again  --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 50
bench ${MODEL}_b128_again --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 30
pack moe_vs_minimind_$MODEL
echo "==== summary"
cat $S
