"""Reading cohort rows: pandas' missing markers (None, NaN, NA, NaT) become None."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pandas as pd


def cell(row: Mapping[str, Any], key: str) -> Any:
    """The row's value for `key`, or None when it is absent or a missing marker."""
    value = row.get(key)
    if value is None:
        return None
    try:
        return None if pd.isna(value) else value
    except (TypeError, ValueError):  # list-like values have no single truth value
        return value
