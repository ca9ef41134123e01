#!/usr/bin/env bash
# Verify on CUDA (every fixture folder), fast kernels, dense benches: packed vs
# packed-docs, AdamW vs Muon; MiniMind-3 one epoch, eval, samples; masked LM vs causal LM.
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a $S
verify_all "minimind fp32" "minimind bf16" "minimind3 fp32" "minimind3 bf16" "seed004 fp32" "seed004 bf16" "muon bf16" "muon fp32"
kernels_all kernels 200
M2=(--tokenizer minimind2 --cuda-graph)
for r in 1 2; do
  bench m2_packed_b128_r$r      "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed
  bench m2_packeddocs_b128_r$r  "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed-docs
done
bench m2_b32        "${M2[@]}" --batch-size 32 --steps 60
bench m2_b32_muon   "${M2[@]}" --batch-size 32 --steps 60 --optimizer muon
bench m2_packeddocs_b32      "${M2[@]}" --batch-size 32 --steps 60 --data-mode packed-docs
bench m2_packeddocs_b32_muon "${M2[@]}" --batch-size 32 --steps 60 --data-mode packed-docs --optimizer muon
grep -h 'optimizer:' $O/bench_m2_b32_muon.err | head -2 | cut -c1-300 | tee -a $S
# Masked LM against causal LM: the same pretrain, 400 micro-steps at batch 32 and at 128.
for b in 32 128; do
  for obj in clm mlm; do
    # MiniMind's tokenizer has no mask token: <|im_start|> (unused in pretraining text) stands in.
    extra=(--tokenizer minimind2); [ $obj = mlm ] && extra+=(--objective mlm --mask-token "<|im_start|>")
    dir=$W/obj_${obj}_$b; rm -rf $dir; mkdir -p $dir
    (cd $dir && timeout 120 $FAST pretrain --device cuda --data-path $W/train.jsonl --cuda-graph --no-progress \
       --num-workers 12 --batch-size $b --accumulation-steps 1 --max-steps 400 --log-interval 100 --sample-tokens 0 \
       "${extra[@]}") >$O/obj_${obj}_$b.txt 2>&1
    row "objective $obj b$b: rc $?; $(grep -E 'Epoch' $O/obj_${obj}_$b.txt | head -1 | cut -c1-200)"
    grep -E 'Epoch' $O/obj_${obj}_$b.txt | tail -1 | cut -c1-220 | tee -a $S
  done
done
# MiniMind-3: one epoch of its preset on the poems, fast eval, samples.
run m3 --model minimind3 --batch-size 32 --accumulation-steps 8
WT=$(ls $W/run_m3/out/*.safetensors | head -1)
TK=${WT%.safetensors}.tokenizer
timeout 60 $FAST eval --weights $WT --data-path $W/heldout.jsonl --tokenizer $TK --device cuda >$O/eval_m3.txt 2>&1
row "eval m3 held-out: rc $? $(tail -1 $O/eval_m3.txt)"
for p in 春 月 江 山; do
  timeout 60 $FAST generate --weights $WT --tokenizer $TK --device cuda --prompt "$p" --max-new-tokens 48 --temperature 0.8 --top-p 0.9 --seed 1 >>$O/generate_m3.txt 2>&1
done
row "generate m3: $(head -c 900 $O/generate_m3.txt | tr '\n' ' ')"
pack checks_dense_mlm_minimind3_epoch
echo "==== summary"
cat $S
