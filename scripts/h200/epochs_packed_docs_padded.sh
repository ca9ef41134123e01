#!/usr/bin/env bash
# One epoch of the 310k training poems with the packed-docs recipe and with MiniMind's padded
# recipe, each timed as a whole command (no --eval-data), then fast eval of both on the held-out
# poems; the same binary, one call.
source "$(dirname "$0")/common.sh"
timed_epoch packed_docs 60 --data-mode packed-docs --batch-size 32 --accumulation-steps 2
timed_epoch padded 150
pack epochs_packed_docs_padded
echo "==== summary"
cat $S
