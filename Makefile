# Two commands for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates .venv if missing and installs what it needs. On a machine without an NVIDIA GPU the
# CPU build torch==2.13.0 is installed first, so nothing pulls a multi-GB CUDA build; set
# TORCH_PIP_ARGS (e.g. to an --index-url of PyTorch's CPU wheels) where pip would otherwise pick one.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.sp_grpo-installed
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
PYTEST_ARGS ?=

.PHONY: install demo test test-all benchmark clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/sp-grpo fit --config configs/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/rollout_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
