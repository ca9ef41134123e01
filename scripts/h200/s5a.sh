#!/usr/bin/env bash
# Session 5, part A: MoE memory. The fused experts node (rows and SwiGLU recomputed in backward,
# --moe-recompute gate-up also the gate/up projection), the router's weight gradient from the
# bf16 rows, the unweighted combine for top-1 renormalised routing. In order of priority (the
# call may run out of device time): verify on the bf16 MoE fixtures, `fast kernels --only moe`,
# both presets at b32 with each --moe-recompute, MiniMind's compiled trainer at b32 (the peaks
# closest to ours), both presets at b128, verify on the fp32 fixtures.
source "$(dirname "$0")/common.sh"
verify_all "minimind bf16" "minimind3 bf16"
t0=$(stamp)
timeout 120 $FAST kernels --device cuda --only moe >$O/kernels_moe.txt 2>&1
row "kernels moe: rc $?, $(grep -c ' ok' $O/kernels_moe.txt) ok, $(grep -c FAIL $O/kernels_moe.txt) FAIL, $(took $t0)s"
grep -E 'FAIL|panicked|rror' $O/kernels_moe.txt | head -10 | cut -c1-220 | tee -a $S
grep -E 'b32_bf16 .*(dgate|fwd\+bwd|speedup)' $O/kernels_moe.txt | head -16 | cut -c1-200 | tee -a $S
pack s5a_1
for MODEL in minimind3-moe minimind2-moe; do
  TK=(); [ $MODEL = minimind2-moe ] && TK=(--tokenizer minimind2)
  bench ${MODEL}_b32        --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 30
  bench ${MODEL}_b32_gateup --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 30 --moe-recompute gate-up
done
pack s5a_2
anchor minimind3-moe_b32_compile $D/minimind3 --hidden 768 --layers 8 --moe 1 --batch 32 --steps 10 --warmup 8 --compile
anchor minimind2-moe_b32_compile $D/minimind2 --hidden 640 --layers 8 --moe 1 --batch 32 --steps 10 --warmup 8 --compile
pack s5a_3
for MODEL in minimind3-moe minimind2-moe; do
  TK=(); [ $MODEL = minimind2-moe ] && TK=(--tokenizer minimind2)
  bench ${MODEL}_b128 --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 15
done
verify_all "minimind fp32" "minimind3 fp32"
pack s5a_4
echo "==== summary"
cat $S
