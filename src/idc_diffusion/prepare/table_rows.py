"""Rows of the prepare stage's tables, ``records.parquet`` (one per image) and
``rejected.parquet`` (one per rejected series, file or slice), and the typed frame they make.

The tables' columns and dtypes are :data:`idc_diffusion.prepare.shard.RECORD_DTYPES` and
:data:`idc_diffusion.prepare.shard.REJECTED_DTYPES`."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from idc_diffusion.core import captions
from idc_diffusion.core.rows import cell
from idc_diffusion.prepare.display_windows import Window

# the caption fields records carry; the window has its own columns
CAPTION_FIELDS = tuple(f for f in captions.CAPTION_FIELDS if f != "window")


def rejection_row(
    uid: str,
    reason: str,
    stage: str,
    file: str | None = None,
    index: int | None = None,
    category: str = "series",
) -> dict:
    """One rejected.parquet row (columns as in REJECTED_DTYPES)."""
    return {
        "SeriesInstanceUID": uid,
        "file": file,
        "slice_index": index,
        "stage": stage,
        "reason": reason,
        "category": category,
    }


def record_row(
    row: Mapping[str, Any],
    file_name: str,
    text: str,
    window: Window,
    fields: Mapping[str, str | None],
    slice_info: Mapping[str, Any],
    shard: int,
    pixel_source: str,
) -> dict:
    """One records.parquet row (columns as in RECORD_DTYPES)."""
    return {
        "file_name": file_name,
        "text": text,
        "split": cell(row, "split"),
        "SeriesInstanceUID": str(row["SeriesInstanceUID"]),
        "StudyInstanceUID": cell(row, "StudyInstanceUID"),
        "collection_id": cell(row, "collection_id"),
        "stratum": cell(row, "stratum"),
        "shard": shard,
        **slice_info,
        "window": window.name,
        "window_center": np.nan if window.center is None else window.center,
        "window_width": np.nan if window.width is None else window.width,
        **{k: fields[k] for k in CAPTION_FIELDS},
        "pixel_source": pixel_source,
        "license_short_name": cell(row, "license_short_name"),
        "voi_index": window.voi_index,
    }


def typed_frame(rows: list[dict], dtypes: Mapping[str, str]) -> pd.DataFrame:
    """A DataFrame with exactly `dtypes`' columns and types (also when empty)."""
    frame = pd.DataFrame(rows, columns=list(dtypes))
    return frame.astype(dict(dtypes))
