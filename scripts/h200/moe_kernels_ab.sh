#!/usr/bin/env bash
# The MoE layer's fused entry (residual add + norm + router logits) and weighted combine: `fast
# kernels --only ops` (the new ops among them) and `--only moe`, verify on the bf16 MoE fixtures,
# and both MoE presets at b32 and b128 with this build against the build before it (BEFORE=a
# carried .device/fast_X.xz) in the same call; an eager profile of minimind2-moe b128.
source "$(dirname "$0")/common.sh"
FAST_BEFORE=$W/fast_before
[ -x $FAST_BEFORE ] || { xz -dc ${BEFORE:?set BEFORE to the earlier build, .device/fast_X.xz} >$FAST_BEFORE && chmod +x $FAST_BEFORE; }
kernels_all kernels_ops 200 --only ops
grep -E '^(moe_norm|combine|add_norm)' $O/kernels_ops.txt | cut -c1-200 | tee -a $S
verify_all "minimind bf16" "minimind3 bf16"
kernels_all kernels_moe 120 --only moe
for MODEL in minimind2-moe minimind3-moe; do
  moe_preset $MODEL
  for B in 32 128; do
    bench ${MODEL}_b${B}        --model $MODEL "${TK[@]}" --cuda-graph --batch-size $B --steps 20
    FAST=$FAST_BEFORE bench ${MODEL}_b${B}_before --model $MODEL "${TK[@]}" --cuda-graph --batch-size $B --steps 20
  done
done
moe_preset minimind2-moe
bench minimind2-moe_b128_prof --model minimind2-moe "${TK[@]}" --batch-size 128 --steps 5 --profile $O/prof_m2moe --profile-steps 3
pack moe_kernels_ab
echo "==== summary"
cat $S
