# IDC-Diffusion — `make demo` (offline CPU demo of the whole workflow), `make test`, and
# `make bench` (all benchmarks, or `make bench BENCH=cohort` for one; see docs/BENCHMARKS.md).
# Both create or reuse the virtualenv in .venv and install everything they need.

PYTHON ?= python3
VENV := .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed
SNAKEMAKE := $(BIN)/snakemake
# Rules run `python -m idc_diffusion ...`: make sure that python is the venv's.
export PATH := $(BIN):$(PATH)

.PHONY: demo test lint bench venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

demo: $(STAMP)
	$(SNAKEMAKE) --profile profiles/local --configfile config/demo.yaml
	@echo "demo done: open results/eval/report.html (SYNTHETIC pixel data, tiny random-init model)"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(SNAKEMAKE) --lint --configfile config/demo.yaml

test: lint
	$(BIN)/pytest

bench: $(STAMP)
	$(BIN)/python bench/run.py $(BENCH)

clean:
	rm -rf results logs benchmarks .snakemake
