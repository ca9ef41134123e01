#!/usr/bin/env bash
# MoE with the combine in the experts' kind: verify (MoE fixtures), kernels,
# both MoE presets against MiniMind's trainer (eager, compiled), one-epoch grouped vs loop, the
# tokenizing pass on 16 cores, and the dense lines for no-regression.
source "$(dirname "$0")/common.sh"
verify_all "minimind fp32" "minimind bf16" "minimind3 fp32" "minimind3 bf16"
kernels_all kernels 200
grep -iE 'moe|expert' $O/kernels.txt | head -12 | cut -c1-200 | tee -a $S
rm -rf $W/tok16; t0=$(stamp)
$FAST tokenize --data-path $W/train.jsonl --tokenizer minimind2 --out $W/tok16 --no-progress >$O/tok16.txt 2>&1
row "tokenize 16 cores: rc $? $(took $t0)s: $(grep tokenized $O/tok16.txt | cut -c1-250)"
M2=(--tokenizer minimind2 --cuda-graph)
bench m2_packeddocs_b128 "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed-docs
bench m2_b32 "${M2[@]}" --batch-size 32 --steps 60
for MODEL in minimind2-moe minimind3-moe; do
  moe_preset $MODEL
  bench ${MODEL}_b32        --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 50
  bench ${MODEL}_b128       --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 30
  anchor ${MODEL}_b32_eager    $MM "${AH[@]}" --batch 32 --steps 40 --warmup 10
  anchor ${MODEL}_b128_eager   $MM "${AH[@]}" --batch 128 --steps 20 --warmup 5
  anchor ${MODEL}_b32_compile  $MM "${AH[@]}" --batch 32 --steps 40 --warmup 15 --compile
  anchor ${MODEL}_b128_compile $MM "${AH[@]}" --batch 128 --steps 20 --warmup 10 --compile
  bench ${MODEL}_b32_again  --model $MODEL "${TK[@]}" --cuda-graph --batch-size 32 --steps 50
  bench ${MODEL}_b128_again --model $MODEL "${TK[@]}" --cuda-graph --batch-size 128 --steps 30
done
pack moe_checks_vs_minimind
echo "==== summary"
cat $S
