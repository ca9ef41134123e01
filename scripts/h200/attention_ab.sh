#!/usr/bin/env bash
# This build's attention against an earlier build's (BEFORE=.device/fast_X.xz) in one call:
# fast kernels --only ops and verify with this build, then the dense benches of both builds side
# by side (26M packed-docs and packed b128, padded b32, MiniMind-3 b32 and b128), twice each, and
# a profile of packed-docs b128. DATA_XZ=.device/poems_sub.jsonl.xz fits both builds in a call.
source "$(dirname "$0")/common.sh"
xz -dc ${BEFORE:?BEFORE=.device/fast_X.xz} > $W/fast_before && chmod +x $W/fast_before
NEW=$W/fast
kernels_all kernels_ops 200 --only ops
grep -E '^a(64|80|96|128)?(c|s|b)?n?_340 +fwd\+bwd' $O/kernels_ops.txt | cut -c1-120 | tee -a $S
verify_all "minimind bf16" "minimind fp32" "minimind3 bf16" "minimind3 fp32"
PD=(--tokenizer minimind2 --cuda-graph --batch-size 128 --steps 30)
for round in 1 2; do
  for side in before new; do
    [ $side = before ] && FAST=$W/fast_before || FAST=$NEW
    bench ${side}_pd_b128_$round     "${PD[@]}" --data-mode packed-docs
    bench ${side}_packed_b128_$round "${PD[@]}" --data-mode packed
    bench ${side}_m2_b32_$round      --tokenizer minimind2 --cuda-graph --batch-size 32 --steps 60
    bench ${side}_m3_b32_$round      --model minimind3 --cuda-graph --batch-size 32 --steps 40
    bench ${side}_m3_b128_$round     --model minimind3 --cuda-graph --batch-size 128 --steps 20
  done
done
FAST=$NEW bench new_pd_prof "${PD[@]}" --data-mode packed-docs --profile $O/prof_pd --profile-steps 3
python3 - $O/prof_pd/kernels.tsv <<'PY' | tee -a $S
import sys, csv
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))[1:]
print("new packed-docs b128 profile: all kernels %.2f ms/step" % (sum(int(r[0]) for r in rows)/3e6))
att = [r for r in rows if "attn_" in r[3]]
for r in att: print("  %7.3f ms  %s" % (int(r[0])/3e6, r[3][:60]))
PY
pack attention_ab
echo "==== summary"
cat $S
