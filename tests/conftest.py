"""Shared fixtures: the repository, its configs and the environment's executables."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest

from idc_diffusion.core.config import load_config

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


def snakemake(
    workdir: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run snakemake on the repo's Snakefile in `workdir` with the venv first on PATH."""
    environment = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(workdir), **(env or {})}
    cmd = [str(BIN / "snakemake"), "-s", str(REPO / "Snakefile"), "--directory", str(workdir)]
    result = subprocess.run([*cmd, *args], capture_output=True, text=True, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"snakemake {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo workflow run once locally, as `make demo` runs it."""
    workdir = tmp_path_factory.mktemp("demo")
    snakemake(
        workdir,
        "--profile",
        str(REPO / "profiles" / "local"),
        "--configfile",
        str(REPO / "config" / "demo.yaml"),
        "-c2",
    )
    return workdir
