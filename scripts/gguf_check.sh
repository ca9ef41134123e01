#!/usr/bin/env bash
# llama.cpp against ours: trains the 26M MiniMind2 (llama) and the 64M MiniMind-3 (qwen3) for 20
# steps on the CPU, exports each as GGUF in f32, f16 and q8_0, loads them with llama.cpp through
# llama-cpp-python, and compares its tokenization and next-token logits with our f32 forward
# (tests/outputs.rs, llama_cpp_tokenizes_and_predicts_as_we_do).
#
# llama-cpp-python compiles llama.cpp from source (about an hour on 2 cores), so it lives in its
# own virtualenv and this check is not part of `make test`:
#   python3 -m venv /tmp/llamacpp-venv
#   CMAKE_BUILD_PARALLEL_LEVEL=1 /tmp/llamacpp-venv/bin/pip install llama-cpp-python numpy
#   scripts/gguf_check.sh /tmp/llamacpp-venv/bin/python
set -euo pipefail
PY=${1:?usage: scripts/gguf_check.sh PYTHON_WITH_LLAMA_CPP}
cd "$(dirname "$0")/.."
"$PY" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__)"

WORK=$(mktemp -d /tmp/gguf_check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
cargo build --release -p fast
FAST=${CARGO_TARGET_DIR:-target}/release/fast
COMMON=(--device cpu --max-steps 20 --max-docs 800 --batch-size 16 --max-seq-len 64
        --learning-rate 3e-3 --sample-tokens 0 --no-progress --tensorboard none
        --checkpoint-dir "$WORK/ck")
# MiniMind2, dense: llama.cpp's `llama` (q/k permuted for its interleaved RoPE).
"$FAST" pretrain "${COMMON[@]}" --model minimind2-small --save-dir "$WORK/mm2" > "$WORK/mm2.log"
# MiniMind-3 (q/k norm, head_dim 96): llama.cpp's `qwen3`.
"$FAST" pretrain "${COMMON[@]}" --model minimind3 --save-dir "$WORK/mm3" > "$WORK/mm3.log"
W2=$(ls "$WORK"/mm2/*.safetensors)
W3=$(ls "$WORK"/mm3/*.safetensors)
MINIMIND_LLAMA_CPP_PYTHON="$PY" MINIMIND_GGUF_CHECK_WEIGHTS="$W2,$W3" \
    cargo test --test outputs llama_cpp_tokenizes_and_predicts_as_we_do -- --nocapture
