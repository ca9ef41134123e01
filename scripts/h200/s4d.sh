#!/usr/bin/env bash
# Session 4, part D: the MoE epoch of s3d.sh on the whole training split (306k poems).
DOCS=all exec bash "$(dirname "$0")/s3d.sh"
