# Two commands: `make demo` and `make test` (both create .venv and install on first use).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint gpu-check install clean

install: $(STAMP)

# torch first and pinned: 2.13.0 is a CPU build on disk here; an unpinned torch pulls a multi-GB CUDA build.
$(STAMP): setup.py pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0 "triton==3.7.1"
	$(BIN)/pip install -q -e ".[dev]"
	@$(BIN)/python -c "import torch; assert torch.__version__.startswith('2.13.0'), 'pip replaced torch: ' + torch.__version__"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/dualloop demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check dualloop kernels tests benchmarks

# On a GPU machine: system python3, no venv, no downloads (see scripts/gpu_check.sh).
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info runs
