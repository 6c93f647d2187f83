# The two commands a new user needs: `make demo` and `make test`.
# Both create (or refresh, when pyproject.toml changes) .venv first.
PYTHON ?= python3
VENV ?= .venv
# GPU users: make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ...
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PYTEST_ARGS ?=

export TUNEFLEET_CACHE ?= $(CURDIR)/.cache/tunefleet
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export WANDB_SILENT ?= true
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: venv demo test test-fast test-dist test-e2e bench gpu-check docs clean

$(BIN)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, from the spec above, then pinned so nothing swaps in a CUDA build.
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/python -c 'import torch; print("torch==" + torch.__version__.split("+")[0])' > $(VENV)/torch-constraint.txt
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[test,qlora]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	$(BIN)/tunefleet launch recipes/tiny/llama-full-ddp.yaml

# The fast tier runs on two pytest workers (pytest-xdist: 145 -> 80 s here, mostly one-process tests that leave a
# core idle); the rest runs in order, as it starts Ray clusters, Slurm daemons and 2-rank process groups itself.
FAST := not e2e and not slow and not dist

test: venv
	$(BIN)/python -m pytest tests -m "$(FAST)" -n 2 $(PYTEST_ARGS); fast=$$?; \
	$(BIN)/python -m pytest tests -m "not ($(FAST))" $(PYTEST_ARGS); rest=$$?; \
	test $$fast -eq 0 -a $$rest -eq 0

test-fast: venv
	$(BIN)/python -m pytest tests -m "$(FAST)" -n 2 $(PYTEST_ARGS)

test-dist: venv
	$(BIN)/python -m pytest tests -m dist $(PYTEST_ARGS)

test-e2e: venv
	$(BIN)/python -m pytest tests -m e2e $(PYTEST_ARGS)

bench: venv
	$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[bench]"
	$(BIN)/python benchmarks/run.py

# On a machine with a CUDA GPU (install with your TORCH_SPEC): the gpu-marked tests and the GPU benchmark
# (tunefleet ddp/fsdp/zero3/LoRA/compile against a plain loop on a 1.1B Llama); writes runs/gpu-check/gpu.md.
gpu-check: venv
	$(BIN)/python benchmarks/gpu.py

# The documentation site, built strictly (any warning fails) into site/; open site/index.html.
docs: venv
	$(BIN)/python -c "import mkdocs, material" 2>/dev/null || \
		$(BIN)/pip install -q -c $(VENV)/torch-constraint.txt -c constraints.txt -e ".[docs]"
	$(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf runs build *.egg-info .pytest_cache
