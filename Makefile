# Quick start: `make demo` (main job on the embedded default) and `make test`.
# Both create .venv on first use. On a machine without an NVIDIA GPU torch is the CPU
# build `torch==2.13.0`; with a GPU, bring the CUDA torch you want (pip install torch)
# before `make`, or set TORCH_SPEC.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
TORCH_SPEC ?= $(if $(HAS_GPU),torch>=2.6,torch==2.13.0)

.PHONY: setup demo test lint
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: setup
	$(BIN)/torchrun --nproc-per-node $(NPROC) launch/infer.py +topology=pcie $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
