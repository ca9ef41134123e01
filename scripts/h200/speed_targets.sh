#!/usr/bin/env bash
# The speed targets (26M packed-docs b128 at 2.2M useful tokens/s; MiniMind-3 at 1.0M padded
# tokens/s at b32 and 1.3M at b128, 3x its own eager b32 and 1.4x its compiled b128) with one
# build in one call: verify --device cuda (MiniMind2 and
# MiniMind-3 fixtures, fp32 and bf16), fast kernels --only ops, the 26M packed-docs against packed
# b128 benches, the MiniMind-3 b32 and b128 benches beside MiniMind-3's own code (eager b32,
# torch.compile b128) with ours measured before and after it, then bench --profile of MiniMind-3
# b128 and 26M packed-docs b128 with the kernel time summed by kind.
source "$(dirname "$0")/common.sh"
nvidia-smi --query-gpu=name,memory.total,clocks.sm --format=csv,noheader | tee -a $S
verify_all "minimind fp32" "minimind bf16" "minimind3 fp32" "minimind3 bf16"
kernels_all kernels_ops 200 --only ops
PD=(--tokenizer minimind2 --cuda-graph --batch-size 128 --steps 30)
M3=(--model minimind3 --cuda-graph)
for r in 1 2; do
  bench pd_b128_r$r     "${PD[@]}" --data-mode packed-docs
  bench packed_b128_r$r "${PD[@]}" --data-mode packed
done
bench m3_b32_r1  "${M3[@]}" --batch-size 32 --steps 60
bench m3_b128_r1 "${M3[@]}" --batch-size 128 --steps 30
anchor m3_b32_eager    $D/minimind3 --hidden 768 --layers 8 --batch 32 --steps 100
anchor m3_b128_compile $D/minimind3 --hidden 768 --layers 8 --batch 128 --steps 60 --compile
bench m3_b32_r2  "${M3[@]}" --batch-size 32 --steps 60
bench m3_b128_r2 "${M3[@]}" --batch-size 128 --steps 30
bench m3_b128_prof "${M3[@]}" --batch-size 128 --steps 20 --profile $O/prof_m3 --profile-steps 3
bench pd_b128_prof "${PD[@]}" --data-mode packed-docs --profile $O/prof_pd --profile-steps 3
for p in m3 pd; do
python3 - $O/prof_$p/kernels.tsv <<'PY' | tee -a $S
import sys, csv, re
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))[1:]
kinds = [("gemm", r"gemm|nvjet|cutlass|sm90_xmma|cublas"), ("attention", r"attn|attention|flash"),
         ("rmsnorm", r"rms"), ("swiglu", r"swiglu"), ("cross-entropy", r"cross_entropy|xent|log_softmax|nll"),
         ("optimizer", r"adam|muon|clip|norm_sq|foreach|multi_tensor"), ("rope/heads", r"rope|heads|qk_norm")]
tot, by = 0, {}
for r in rows:
    ns, name = int(r[0]), r[2] + " " + r[3]
    k = next((k for k, pat in kinds if re.search(pat, name, re.I)), "rest")
    by[k] = by.get(k, 0) + ns; tot += ns
print(sys.argv[1], "total %.3f ms/step, %d launches/step" % (tot / 3e6, sum(int(r[1]) for r in rows) / 3))
for k, ns in sorted(by.items(), key=lambda kv: -kv[1]): print("  %-14s %7.3f ms" % (k, ns / 3e6))
for r in rows[:14]: print("  %7.3f ms %5.1f  %-28s %s" % (int(r[0]) / 3e6, int(r[1]) / 3, r[2][:28], r[3][:80]))
PY
rm -f $O/prof_$p/trace.json
done
pack speed_targets
echo "==== summary"
cat $S
