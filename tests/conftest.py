"""Shared fixtures: the repository, its configs and the environment's executables."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest

from idc_diffusion.config import load_config

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def repo() -> Path:
    return REPO


@pytest.fixture(scope="session")
def _demo_config() -> dict:
    return load_config(REPO / "config" / "demo.yaml")


@pytest.fixture
def demo_config(_demo_config: dict) -> dict:
    """The validated demo config (a fresh copy per test, free to modify)."""
    return copy.deepcopy(_demo_config)
