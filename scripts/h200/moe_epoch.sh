#!/usr/bin/env bash
# One epoch of MoE pretraining on the whole poems corpus (the 26M config with MiniMind2's MoE,
# b128 x 2, same seed): grouped experts with --cuda-graph and the default --moe-recompute swiglu,
# then the per-expert loop (eager), each scored by fast eval on the held-out poems.
source "$(dirname "$0")/common.sh"
moe_epoch grouped 200 400
moe_epoch loop 260 400
pack moe_epoch
echo "==== summary"
cat $S
