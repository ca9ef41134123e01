#!/usr/bin/env bash
# The MoE fixtures on the GPU (verify, fast kernels --only moe); both MoE presets with the
# default --moe-recompute swiglu against MiniMind's own trainer (eager, compiled), ours measured
# before and after MiniMind's runs; gate-up beside them at b32.
source "$(dirname "$0")/common.sh"
verify_all "minimind bf16" "minimind3 bf16" "minimind fp32" "minimind3 fp32"
kernels_all kernels_moe 120 --only moe
grep -E 'b(32|128)_bf16 .*(fwd\+bwd)' $O/kernels_moe.txt | head -16 | cut -c1-200 | tee -a $S
for MODEL in minimind2-moe minimind3-moe; do
  moe_preset $MODEL
  bench ${MODEL}_b32        --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 40
  bench ${MODEL}_b128       --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 20
  bench ${MODEL}_b32_gateup --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 40 --moe-recompute gate-up
  anchor ${MODEL}_b32_eager    $MM "${AH[@]}" --batch 32 --steps 30 --warmup 8
  anchor ${MODEL}_b128_eager   $MM "${AH[@]}" --batch 128 --steps 15 --warmup 5
  anchor ${MODEL}_b32_compile  $MM "${AH[@]}" --batch 32 --steps 30 --warmup 12 --compile
  anchor ${MODEL}_b128_compile $MM "${AH[@]}" --batch 128 --steps 15 --warmup 8 --compile
  bench ${MODEL}_b32_again  --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 40
  bench ${MODEL}_b128_again --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 20
done
pack moe_fixtures_vs_minimind
echo "==== summary"
cat $S
