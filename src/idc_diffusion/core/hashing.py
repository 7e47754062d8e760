"""Stable hashes: of files (weights identity) and of keys (seeds, splits, shards)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def key_digest(*parts: object) -> bytes:
    """SHA-256 of the parts' text joined by a unit separator: the same parts, the same bytes."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
