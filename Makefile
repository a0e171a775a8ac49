# Two commands for a fresh machine with only Python 3.11 + pip:  `make demo`  and  `make test`.
# Each creates (once) a virtual environment in .venv with dust and its dependencies.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of PyTorch (see DEVELOPERS.md); an unpinned `torch` would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0
export TORCH  # tests/test_packaging.py installs the same build into its clean venv
DUST_DATA ?= $(abspath ../shared/data)
export DUST_DATA

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip uninstall -q -y dust 2>/dev/null || true  # the distribution's name before dust-seg
	$(VENV)/bin/python -m pip install -q -e '.[dev]'
	touch $@

.PHONY: demo test lint
demo: $(VENV)/.installed
	$(VENV)/bin/dust demo

test: $(VENV)/.installed lint
	$(VENV)/bin/python -m pytest -q

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check src tests benchmarks
