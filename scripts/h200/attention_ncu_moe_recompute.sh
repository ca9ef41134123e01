#!/usr/bin/env bash
# Where the attention kernels stall (ncu on the first launches of an eager step), the attention
# ops' timings, and the MoE recompute modes: verify on the bf16 MoE fixtures, `fast kernels
# --only moe`, both presets at b32 and b128 in each mode (peak memory against MiniMind's compiled
# peaks of moe_checks_vs_minimind.sh: 5.96 / 15.57 GiB minimind3-moe, 6.70 / 20.62 minimind2-moe).
source "$(dirname "$0")/common.sh"
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu /usr/local/cuda/bin/ncu 2>/dev/null | head -1)
row "ncu: $NCU"
prof() {
  local name=$1; shift
  local t0=$(stamp)
  timeout 150 $NCU --clock-control none -k regex:attn_ -c 10 --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    $FAST bench --data-path $W/train.jsonl --num-workers 12 --steps 1 --warmup 1 "$@" >$O/ncu_$name.txt 2>&1
  row "ncu $name: rc $?, $(took $t0)s"
  grep -E "attn_|Duration|Achieved Occupancy|Theoretical Occupancy|Registers Per|Compute \(SM\) Throughput|Memory Throughput|L2 Hit|Warp Cycles Per Issued|Issued Warp Per|No Eligible|Block Limit" $O/ncu_$name.txt \
    | sed -E 's/\(anonymous namespace\):://g; s/\(__nv_bfloat16.*//' | head -150 >>$S
}
prof m2_docs_b128 --tokenizer minimind2 --batch-size 128 --data-mode packed-docs
prof m3_b128 --model minimind3 --batch-size 128
pack attention_ncu_moe_recompute_0
kernels_all kernels_ops 150 --only ops
grep -E '^a(64|96|128)' $O/kernels_ops.txt | grep -E 'fwd\+bwd|ms' | head -40 | cut -c1-160 | tee -a $S
verify_all "minimind bf16 --moe-recompute swiglu" "minimind3 bf16 --moe-recompute swiglu" \
  "minimind bf16 --moe-recompute gate-up" "minimind3 bf16 --moe-recompute gate-up"
kernels_all kernels_moe 120 --only moe
grep -E 'b(32|128)_bf16 .*(fwd\+bwd)' $O/kernels_moe.txt | head -16 | cut -c1-200 | tee -a $S
pack attention_ncu_moe_recompute_1
for B in 32 128; do
  for MODEL in minimind3-moe minimind2-moe; do
    TK=(); [ $MODEL = minimind2-moe ] && TK=(--tokenizer minimind2)
    for R in off swiglu gate-up; do
      bench ${MODEL}_b${B}_$R --model $MODEL "${TK[@]}" --cuda-graph --batch-size $B --steps 20 --moe-recompute $R
    done
  done
done
pack attention_ncu_moe_recompute_2
echo "==== summary"
cat $S
