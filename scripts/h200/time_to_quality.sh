#!/usr/bin/env bash
# Time to held-out quality. One epoch of the poems (26M, MiniMind's tokenizer,
# seq 340), scored on the 2,000 held-out poems during training: MiniMind's recipe (padded, b32 x 8,
# AdamW 5e-4) against Muon, and packed-docs rows with AdamW and with Muon.
source "$(dirname "$0")/common.sh"
M2=(--tokenizer minimind2)
run adamw        "${M2[@]}"
run muon_cos     "${M2[@]}" --optimizer muon --muon-lr 0.02 --muon-weight-decay 0
run muon_wsd     "${M2[@]}" --optimizer muon --muon-lr 0.02 --muon-weight-decay 0 --lr-schedule wsd --warmup-steps 10 --decay-fraction 0.3 --min-lr-ratio 0.1
EVI=100 run pd_b32x2     "${M2[@]}" --data-mode packed-docs --batch-size 32 --accumulation-steps 2
EVI=100 run pd_b32x2_lr1e3 "${M2[@]}" --data-mode packed-docs --batch-size 32 --accumulation-steps 2 --learning-rate 1e-3
EVI=100 run pd_b32x2_muon "${M2[@]}" --data-mode packed-docs --batch-size 32 --accumulation-steps 2 --optimizer muon --muon-lr 0.02 --muon-weight-decay 0
python3 - $O <<'PY' | tee -a $S
import json, sys, glob, os
for p in sorted(glob.glob(sys.argv[1] + "/metrics_*.jsonl")):
    rows = [json.loads(l) for l in open(p)]
    ev = [(r["step"], r.get("elapsed_s"), r["eval_loss"]) for r in rows if r.get("eval_loss") is not None]
    print(os.path.basename(p), "eval (micro-step, s, loss):", " ".join(f"{s}:{t if t is None else round(t,1)}:{l:.4f}" for s, t, l in ev))
PY
pack time_to_quality
echo "==== summary"
cat $S
