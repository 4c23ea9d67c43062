# Two commands on a fresh machine with only Python 3 and make:
#   make demo   -> creates .venv, installs the package (+ examples extras), runs examples/quickstart.py
#   make test   -> creates .venv with the dev extras, runs the whole test suite
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[examples]"
	touch $@

$(VENV)/.installed-dev: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(PY) examples/quickstart.py

test: $(VENV)/.installed-dev
	$(PY) -m pytest

lint: $(VENV)/.installed-dev
	$(VENV)/bin/ruff check optax_balance tests examples benchmarks
	$(VENV)/bin/ruff format --check optax_balance tests examples benchmarks
	$(VENV)/bin/pyright

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info
