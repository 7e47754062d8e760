"""Where the bundled IDC index lives and which IDC release it is."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import duckdb
import idc_index_data
import pandas as pd


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


def human_collections(files: IndexFiles) -> list[str]:
    """collection_id of every collection whose species (collections index) is Human."""
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT collection_id FROM read_parquet(?) WHERE species = 'Human' ORDER BY 1",
            [str(files.collections)],
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def vocabulary(files: IndexFiles) -> dict[str, set[str]]:
    """Distinct collections, upper-case body parts and modalities of the series index."""
    con = duckdb.connect()
    try:
        rows = con.execute(
            "SELECT list(DISTINCT collection_id), list(DISTINCT upper(BodyPartExamined)), "
            "list(DISTINCT Modality) FROM read_parquet(?)",
            [str(files.series)],
        ).fetchone()
    finally:
        con.close()
    names = ("collections", "body_parts", "modalities")
    return {k: {v for v in values if v} for k, values in zip(names, rows, strict=True)}


class DuckDBIndex:
    """The cohort backend for a series-level parquet (the bundled IDC index by default)."""

    name = "duckdb"

    def __init__(self, files: IndexFiles) -> None:
        self.files = files
        self._con = duckdb.connect()

    def source_sql(self) -> str:
        path = str(self.files.series).replace("'", "''")
        return f"SELECT * FROM read_parquet('{path}')"

    def columns(self) -> list[str]:
        return [r[0] for r in self._con.execute(f"DESCRIBE {self.source_sql()}").fetchall()]

    def query(self, sql: str) -> pd.DataFrame:
        return self._con.execute(sql).df()

    def close(self) -> None:
        self._con.close()
