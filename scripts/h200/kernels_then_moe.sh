#!/usr/bin/env bash
# `fast kernels --only ops` (our attention at head dim 80, MiniMind2-MoE's, among the cases; the
# MoE entry and combine), then moe_fixtures_vs_minimind.sh (MoE fixtures, both MoE presets against MiniMind's trainer)
# in the same call.
source "$(dirname "$0")/common.sh"
kernels_all kernels_ops 200 --only ops
grep -E '^(a80|moe_norm|combine)' $O/kernels_ops.txt | grep -E 'fwd\+bwd|FAIL' | cut -c1-160 | tee -a $S
pack kernels_then_moe
bash "$(dirname "$0")/moe_fixtures_vs_minimind.sh"
