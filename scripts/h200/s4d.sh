#!/usr/bin/env bash
# The MoE epoch of s3d.sh on the whole training split (306k poems).
DOCS=all exec bash "$(dirname "$0")/s3d.sh"
