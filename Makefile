# Two commands do everything on a fresh machine: `make pretrain` and `make test`.
# Set-up is idempotent: a second run installs nothing.
SHELL := /bin/bash
VENV  := .venv
PY    := $(VENV)/bin/python
TORCH_VERSION := 2.11.0
# Stamp files record what is installed, so re-running set-up costs nothing.
TORCH_STAMP := $(VENV)/.stamp-torch-$(TORCH_VERSION)
EXTRAS_STAMP := $(VENV)/.stamp-extras-3
CUDA_STAMP   := $(VENV)/.stamp-cuda-toolkit-13.0.2

.PHONY: setup setup-cuda test pretrain release release-cuda doctor verify bench clean-venv

setup: $(TORCH_STAMP) $(EXTRAS_STAMP)

$(TORCH_STAMP):
	@command -v python3 >/dev/null || { echo "python3 is needed to install libtorch (torch==$(TORCH_VERSION))"; exit 1; }
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --disable-pip-version-check --no-cache-dir --quiet "torch==$(TORCH_VERSION)"
	# tch finds libtorch through this link (.cargo/config.toml sets LIBTORCH=.venv/libtorch).
	ln -sfn "$$($(PY) -c 'import torch, os; print(os.path.dirname(torch.__file__))' 2>/dev/null)" $(VENV)/libtorch
	test -f $(VENV)/libtorch/lib/libtorch_cpu.so
	touch $@

# Python packages used only by tests that compare against the Python ecosystem.
$(EXTRAS_STAMP): $(TORCH_STAMP)
	# numpy: fixture scripts; transformers: the test that loads our exported folder in Hugging Face;
	# tensorboard and gguf: tests/outputs.rs reads our event files and GGUF exports back with them.
	$(PY) -m pip install --disable-pip-version-check --quiet numpy "transformers==5.23.0" \
		"tensorboard==2.21.0" "gguf==0.19.0"
	touch $@

# CUDA 13.0 headers and nvcc (cccl for at::cuda::CUDAGraph's headers), needed only to build
# `--features nccl` (data parallelism over c10d) or `--features cuda` (that plus CUDA graphs).
setup-cuda: $(CUDA_STAMP)

$(CUDA_STAMP): $(TORCH_STAMP)
	# nvvm and crt pinned to nvcc's release: pip would otherwise pick 13.5, whose PTX ptxas 13.0 refuses.
	$(PY) -m pip install --disable-pip-version-check --quiet "cuda-toolkit[cccl,nvcc]==13.0.2" \
		"nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88"
	touch $@

# Property tests draw new random cases on every plain `cargo test`; `make test` (CI) pins
# proptest's seed so that a landing does not depend on luck. Override: PROPTEST_RNG_SEED=N make test.
test: setup
	PROPTEST_RNG_SEED=$${PROPTEST_RNG_SEED:-20261126} cargo test --workspace

# Training needs libtorch only; the Python extras are for tests.
pretrain: $(TORCH_STAMP)
	cargo run --release -p fast -- pretrain

release: $(TORCH_STAMP)
	cargo build --release --workspace

# The binaries for GPU machines: NCCL data parallelism, CUDA graphs and fused kernels
# (target/release/fast), and `verify` checking that path on the GPU (target/release/verify).
release-cuda: setup setup-cuda
	cargo build --release -p fast --features cuda
	cargo build --release -p harness --bin verify --features cuda

doctor: setup
	cargo run --release -p fast -- doctor

verify: setup
	cargo run --release -p harness --bin verify -- --fixtures golden/minimind --path reference
	cargo run --release -p harness --bin verify -- --fixtures golden/minimind --path fast --device cpu --precision fp32

bench: setup
	cargo bench --workspace

clean-venv:
	rm -rf $(VENV)
