#!/usr/bin/env bash
# MoE peak memory by path (graph, eager, loop) at batch 32 and 128.
source "$(dirname "$0")/common.sh"
for MODEL in minimind3-moe minimind2-moe; do
  TK=(); [ $MODEL = minimind2-moe ] && TK=(--tokenizer minimind2)
  for b in 32 128; do
    bench ${MODEL}_b${b}_graph --model $MODEL "${TK[@]}" --cuda-graph --batch-size $b --steps 10
    bench ${MODEL}_b${b}_eager --model $MODEL "${TK[@]}" --batch-size $b --steps 10
  done
done
pack moe_peak_memory
