#!/usr/bin/env bash
# Packed-docs profiled with its document starts.
source "$(dirname "$0")/common.sh"
M2=(--tokenizer minimind2 --cuda-graph)
bench m2_packeddocs_b128 "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed-docs --profile $O/prof_pd --profile-steps 3
bench m2_packed_b128     "${M2[@]}" --batch-size 128 --steps 30 --data-mode packed --profile $O/prof_p --profile-steps 3
for p in pd p; do
python3 - $O/prof_$p/kernels.tsv <<'PY' | tee -a $S
import sys, csv
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))[1:]
print(sys.argv[1], "total %.2f ms/step" % (sum(int(r[0]) for r in rows)/3e6))
for r in rows[:16]: print("  %7.3f ms %4s  %s" % (int(r[0])/3e6, r[1], r[3][:110]))
PY
done
pack profile_packed
