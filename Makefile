# Two commands on a fresh machine (Python >= 3.10): `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: a looser spec would pull a multi-GB CUDA build where a CPU one is wanted.
TORCH ?= torch==2.13.0

.PHONY: demo test lint clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,plot]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/implicit-updates demo

test: $(BIN)/.installed
	$(BIN)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check implicit_updates adapters tests examples benchmarks

clean:
	rm -rf $(VENV) build *.egg-info
