#!/usr/bin/env bash
# MoE memory: --moe-recompute off (autograd keeps everything), swiglu (our experts node: the
# gathered rows and the SwiGLU output recomputed in backward; the router's weight gradient from
# the bf16 rows) and gate-up (also the gate/up projection recomputed). In order of priority, as
# a call may run out of device time: verify on the bf16 MoE fixtures with each mode, `fast
# kernels --only moe` (each mode against the loop), both presets at b32 in each mode, MiniMind's
# compiled trainer at b32 (the peaks closest to ours), both presets at b128, the fp32 fixtures.
source "$(dirname "$0")/common.sh"
verify_all "minimind bf16" "minimind3 bf16" \
  "minimind bf16 --moe-recompute swiglu" "minimind3 bf16 --moe-recompute swiglu" \
  "minimind bf16 --moe-recompute gate-up" "minimind3 bf16 --moe-recompute gate-up"
kernels_all kernels_moe 120 --only moe
grep -E 'b32_bf16 .*(dgate|fwd\+bwd)' $O/kernels_moe.txt | head -16 | cut -c1-200 | tee -a $S
pack s5a_1
for MODEL in minimind3-moe minimind2-moe; do
  TK=(); [ $MODEL = minimind2-moe ] && TK=(--tokenizer minimind2)
  for R in off swiglu gate-up; do
    bench ${MODEL}_b32_$R --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 30 --moe-recompute $R
  done
done
pack s5a_2
anchor minimind3-moe_b32_compile $D/minimind3 --hidden 768 --layers 8 --moe 1 --batch 32 --steps 10 --warmup 8 --compile
anchor minimind2-moe_b32_compile $D/minimind2 --hidden 640 --layers 8 --moe 1 --batch 32 --steps 10 --warmup 8 --compile
pack s5a_3
for MODEL in minimind3-moe minimind2-moe; do
  TK=(); [ $MODEL = minimind2-moe ] && TK=(--tokenizer minimind2)
  for R in swiglu gate-up; do
    bench ${MODEL}_b128_$R --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 15 --moe-recompute $R
  done
done
verify_all "minimind fp32" "minimind3 fp32"
pack s5a_4
echo "==== summary"
cat $S
