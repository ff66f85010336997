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

# configs/demo.yaml keeps its result in runs/demo/checkpoints/last.ckpt (replaced by each run), which
# the printed commands sample and export.
DEMO_CKPT := runs/demo/checkpoints/last.ckpt
DEMO_PROMPTS := "a red plus moving up" "a green ring moving down" "a blue x moving right" "a yellow square moving left"

demo: $(STAMP)
	$(BIN)/sp-grpo fit --config configs/demo.yaml
	@echo ""
	@echo "Sample the trained generator on your own prompts (and, without --ckpt, the generator before training):"
	@echo '  $(BIN)/sp-grpo sample --config configs/demo.yaml --ckpt $(DEMO_CKPT) --prompts $(DEMO_PROMPTS) --out runs/demo/sample_after'
	@echo '  $(BIN)/sp-grpo sample --config configs/demo.yaml --prompts $(DEMO_PROMPTS) --out runs/demo/sample_before'
	@echo "Export it as a diffusers WanPipeline folder:"
	@echo '  $(BIN)/sp-grpo export --config configs/demo.yaml --ckpt $(DEMO_CKPT) --out runs/demo/export'

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -m "" $(PYTEST_ARGS)

benchmark: $(STAMP)
	$(BIN)/python benchmarks/rollout_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
