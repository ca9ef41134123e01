#!/usr/bin/env bash
# Profile of the current build: packed-docs b128 and MiniMind-3 b32, every kernel row.
source "$(dirname "$0")/common.sh"
PD=(--tokenizer minimind2 --cuda-graph --batch-size 128 --steps 30)
bench pd_b128 "${PD[@]}" --data-mode packed-docs
bench m3_b32 --model minimind3 --cuda-graph --batch-size 32 --steps 40
bench pd_prof "${PD[@]}" --data-mode packed-docs --profile $O/prof_pd --profile-steps 3
bench m3_prof --model minimind3 --cuda-graph --batch-size 32 --steps 20 --profile $O/prof_m3 --profile-steps 3
for p in pd m3; do
python3 - $O/prof_$p/kernels.tsv <<'PY' | tee -a $S
import sys, csv
rows = list(csv.reader(open(sys.argv[1]), delimiter="\t"))[1:]
print(sys.argv[1], "total %.3f ms/step, %d kernel launches/step" % (sum(int(r[0]) for r in rows)/3e6, sum(int(r[1]) for r in rows)/3))
for r in rows: print("  %7.3f ms %5.1f  %-28s %s" % (int(r[0])/3e6, int(r[1])/3, r[2][:28], r[3][:90]))
PY
rm -f $O/prof_$p/trace.json
done
pack profile_kernels
echo "==== summary"
cat $S
