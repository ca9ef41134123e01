#!/usr/bin/env bash
# The packed-docs targets (2.2M useful tokens/s at b128; one epoch within 35 s and within 0.01 of
# the padded recipe's held-out loss) with one build, on the whole corpus, in one call: fast bench of
# packed-docs against packed at b128 (rows of the 310k training poems, twice each), then one
# epoch each of the packed-docs recipe and MiniMind's padded recipe timed as whole commands, and
# fast eval of both on the held-out poems.
source "$(dirname "$0")/common.sh"
PD=(--tokenizer minimind2 --cuda-graph --batch-size 128 --steps 30)
for round in 1 2; do
  bench pd_b128_$round "${PD[@]}" --data-mode packed-docs
  bench packed_b128_$round "${PD[@]}" --data-mode packed
done
timed_epoch packed_docs 60 --data-mode packed-docs --batch-size 32 --accumulation-steps 2
timed_epoch padded 150
pack packed_docs_targets
echo "==== summary"
cat $S
