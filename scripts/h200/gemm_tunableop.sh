#!/usr/bin/env bash
# GEMM choice: libtorch's TunableOp (each GEMM shape timed over cuBLAS's algorithms during the
# eager warm-up, before capture) against cuBLAS's heuristics, the same binary, one call, twice.
# TunableOp is switched by PyTorch's environment variables here only, for this measurement.
source "$(dirname "$0")/common.sh"
PD=(--tokenizer minimind2 --cuda-graph --batch-size 128 --steps 30 --data-mode packed-docs)
M3=(--model minimind3 --cuda-graph --batch-size 32 --steps 40)
for r in 1 2; do
  bench base_pd_$r "${PD[@]}"
  PYTORCH_TUNABLEOP_ENABLED=1 PYTORCH_TUNABLEOP_TUNING=1 PYTORCH_TUNABLEOP_FILENAME=$W/tun_pd_$r.csv bench tun_pd_$r "${PD[@]}"
  bench base_m3_$r "${M3[@]}"
  PYTORCH_TUNABLEOP_ENABLED=1 PYTORCH_TUNABLEOP_TUNING=1 PYTORCH_TUNABLEOP_FILENAME=$W/tun_m3_$r.csv bench tun_m3_$r "${M3[@]}"
done
tail -5 $O/bench_tun_pd_1.err | cut -c1-200
ls -la $W/*.csv* 2>&1 | head; cp $W/tun_*csv* $O/ 2>/dev/null
pack gemm_tunableop
echo "==== summary"; cat $S
