"""Where the bundled IDC index lives and which IDC release it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import idc_index_data


@dataclass(frozen=True)
class IndexFiles:
    """The parquet tables of one IDC index release."""

    series: Path
    collections: Path
    versions: Path
    package_version: str


def bundled_index(series_parquet: str | Path | None = None) -> IndexFiles:
    """The `idc-index-data` tables; `series_parquet` overrides the series table (a pinned copy)."""
    series = (
        Path(series_parquet) if series_parquet else Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH)
    )
    if not series.is_file():
        raise FileNotFoundError(
            f"cohort.index_parquet: {series} does not exist; set it to an IDC series index "
            "parquet or to null for the one bundled with idc-index-data"
        )
    folder = Path(idc_index_data.IDC_INDEX_PARQUET_FILEPATH).parent
    return IndexFiles(
        series=series,
        collections=folder / "collections_index.parquet",
        versions=folder / "version_metadata_index.parquet",
        package_version=idc_index_data.__version__,
    )


def idc_version(files: IndexFiles) -> int:
    """The IDC data release (e.g. 25) the bundled index describes."""
    con = duckdb.connect()
    try:
        return int(
            con.execute(
                "SELECT max(idc_version) FROM read_parquet(?)", [str(files.versions)]
            ).fetchone()[0]
        )
    finally:
        con.close()
