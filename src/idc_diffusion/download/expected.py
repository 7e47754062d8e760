"""What a cohort row says to expect of a series, besides its UIDs: instance count, listed
objects and series size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idc_diffusion.core.rows import cell
from idc_diffusion.download.verify import ListedFiles


def expected_count(row: Mapping[str, Any]) -> int | None:
    """The row's instanceCount as an int, or None when the index has none."""
    value = cell(row, "instanceCount")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def listed_files(row: Mapping[str, Any]) -> ListedFiles | None:
    """name -> (size, MD5) of the series' objects when the cohort carries them
    (``instance_files``: ``<crdc_instance_uuid>.dcm <instance_size> <instance_hash>`` per
    instance, ``;``-separated; BigQuery cohorts), else None (also when it does not list
    every instance: CONCAT drops instances whose size or hash is NULL)."""
    text = cell(row, "instance_files")
    if not isinstance(text, str) or not text:
        return None
    listed = {}
    for item in text.split(";"):
        name, size, md5 = item.split(" ")
        listed[name] = (int(size), md5)
    return listed if len(listed) == expected_count(row) else None  # else: rows lack a hash


def expected_bytes(rows: list[dict[str, Any]]) -> int | None:
    """Sum of the index's series sizes (for progress), or None when unknown."""
    sizes = [cell(row, "series_size_MB") for row in rows]
    known = [float(s) for s in sizes if isinstance(s, int | float)]
    return int(sum(known) * 1e6) if known else None
