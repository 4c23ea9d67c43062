# Two commands on a fresh machine with only Python 3 and make:
#   make demo   -> creates .venv, installs the package (+ examples extras), runs examples/quickstart.py
#   make test   -> creates .venv with the dev extras (pinned by constraints.txt), runs the
#                  whole test suite on all cores (JOBS=1 for one process)
#   make bench  -> creates .venv with the bench extra (torch, torchjd), runs benchmarks/run.py
#                  and writes benchmarks/RESULTS.md (BENCH_QUICK=1: a quick smoke run)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# pytest-xdist workers for `make test` (the suite is compile-bound: one per core).
JOBS ?= auto

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[examples]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(VENV)/.installed $@

# The torch wheel for the bench extra (torchjd's backend): the registry's torch==2.13.0
# (on Linux x86_64 a CUDA build, which the GPU section needs; CPU-only hosts run it on the
# CPU), or say otherwise, e.g. a CPU-only build:
#   make bench TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
# On a host with an NVIDIA GPU (nvidia-smi on the PATH) JAX also gets its CUDA plugin, so
# the run uses the GPU and writes RESULTS.md's GPU section; JAX_CUDA= turns that off.
JAX_CUDA ?= $(if $(shell command -v nvidia-smi 2>/dev/null),jax[cuda12],)

$(VENV)/.installed-bench: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt $(TORCH_PIP_ARGS) "$(TORCH)"
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]" $(if $(JAX_CUDA),"$(JAX_CUDA)")
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed-dev
	$(PY) -m pytest -n $(JOBS)

bench: $(VENV)/.installed-bench
	$(PY) -m benchmarks.run

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check optax_balance tests examples benchmarks
	$(VENV)/bin/ruff format --check optax_balance tests examples benchmarks
	$(VENV)/bin/pyright

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
