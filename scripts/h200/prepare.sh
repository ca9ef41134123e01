#!/usr/bin/env bash
# Fills .device/ (ignored by git) with what the scripts in scripts/h200/ need on a GPU machine
# that has PyTorch 2.11 but no Rust and no network: stripped, xz-compressed `fast` and `verify`
# (from `make release-cuda`), the poems corpus (scripts/build_corpus.sh), MiniMind's own model and
# dataset code for the anchors (MiniMind2 at 3a5aba8 and MiniMind-3 at d65ef2c, from a clone given
# as MINIMIND_GIT) and the anchor scripts of scripts/h200/anchor/ (MiniMind's trainer step timed,
# held-out loss scored MiniMind's way). Then carry .device and the tree to the GPU machine and run
# the parts from the repository root.
set -euo pipefail
cd "$(dirname "$0")/../.."
CORPUS=${CORPUS:-data/poems_full.jsonl}
MINIMIND_GIT=${MINIMIND_GIT:?set MINIMIND_GIT to a clone of jingyaogong/minimind (its .git directory)}
ANCHOR=${ANCHOR:-scripts/h200/anchor}
mkdir -p .device
for b in fast verify; do
  strip -o /tmp/$b.stripped target/release/$b
  xz -T0 -6 -c /tmp/$b.stripped >.device/$b.xz
done
[ -f "$CORPUS" ] || { echo "no $CORPUS: run scripts/build_corpus.sh first" >&2; exit 1; }
xz -T0 -6 -c "$CORPUS" >.device/poems_full.jsonl.xz
for v in "minimind2 3a5aba8" "minimind3 d65ef2c"; do
  set -- $v
  rm -rf .device/$1 && mkdir -p .device/$1
  git --git-dir="$MINIMIND_GIT" archive "$2" model dataset | tar -x -C .device/$1
  cp "$ANCHOR/datasets_shim.py" .device/$1/
done
cp "$ANCHOR/minimind_bench.py" "$ANCHOR/minimind_eval.py" .device/
du -sh .device
