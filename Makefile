# Two commands from a fresh clone: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
NPROC ?= 2

.PHONY: venv demo test test-all test-fast bench gpu-check clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch first (a CPU build unless one is already there), then the package and its extras;
# DS_BUILD_OPS=0 keeps DeepSpeed from compiling CUDA ops.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	DS_BUILD_OPS=0 $(BIN)/python -m pip install -q -e ".[test,fp8,deepspeed]"
	touch $@

venv: $(VENV)/.installed

DEMO_PLAN ?= fsdp+ac

# 2 CPU processes (gloo): FSDP2-sharded, activation-checkpointed tiny Llama; 8 steps with a
# checkpoint every 4, then a fresh launch that resumes from the latest and runs to 12; the
# step metrics of both (out/demo/metrics) are plotted to out/demo/plot.png.
demo: venv
	rm -rf out/demo
	OMP_NUM_THREADS=1 $(BIN)/overdrive launch --nproc $(NPROC) examples/train_llm.py --plan $(DEMO_PLAN) --steps 8 --save-every 4 --out out/demo
	OMP_NUM_THREADS=1 $(BIN)/overdrive launch --nproc $(NPROC) examples/train_llm.py --plan $(DEMO_PLAN) --steps 12 --save-every 4 --out out/demo --resume
	$(BIN)/overdrive plot out/demo/metrics --out out/demo/plot.png

# make test is what CI runs (kept under 20 min here; it lists the 25 slowest tests so the
# budget stays visible); test-all adds the long matrices.
test: venv
	$(BIN)/python -m pytest -q -m "not slow" --durations=25

test-all: venv
	$(BIN)/python -m pytest -q

test-fast: venv
	$(BIN)/python -m pytest -q -m "not dist and not inductor"

bench: venv
	$(BIN)/python benchmarks/run_all.py

# one GPU, <= 8 min (benchmarks/README.md: the CUDA torch install line)
gpu-check: venv
	$(BIN)/python benchmarks/gpu_check.py

clean:
	rm -rf $(VENV) out .pytest_cache
