#!/usr/bin/env bash
# Verify on CUDA, fast kernels, benches of the dense presets (AdamW and Muon)
# beside MiniMind-3's own trainer.
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a $S
verify_all "minimind fp32" "minimind bf16" "minimind3 fp32" "minimind3 bf16" "seed004 fp32" "seed004 bf16" "muon bf16" "muon fp32"
grep -h muon $O/verify_muon_*.txt | tee -a $S
kernels_all kernels 300
M2=(--tokenizer minimind2 --cuda-graph)
M3=(--model minimind3 --cuda-graph)
bench m2_b32        "${M2[@]}" --batch-size 32 --steps 60
bench m2_b32_muon   "${M2[@]}" --batch-size 32 --steps 60 --optimizer muon
bench m2_b128       "${M2[@]}" --batch-size 128 --steps 30
bench m2_b128_muon  "${M2[@]}" --batch-size 128 --steps 30 --optimizer muon
bench m3_b32        "${M3[@]}" --batch-size 32 --steps 60
bench m3_b128       "${M3[@]}" --batch-size 128 --steps 30
grep -h 'kernels:\|optimizer:' $O/bench_m3_b32.err $O/bench_m2_b32_muon.err | head -4 | cut -c1-300 | tee -a $S
anchor m3_b32_eager   $D/minimind3 --hidden 768 --layers 8 --batch 32 --steps 100
anchor m3_b128_compile $D/minimind3 --hidden 768 --layers 8 --batch 128 --steps 60 --compile
bench m3_b32_again    "${M3[@]}" --batch-size 32 --steps 60
bench m3_b128_again   "${M3[@]}" --batch-size 128 --steps 30
pack dense_vs_minimind3
echo "==== summary"
cat $S
