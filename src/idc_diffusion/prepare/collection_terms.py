"""A collection's disease and site for captions, from IDC's collections index.

The cohort rows may carry ``cancer_types`` / ``tumor_locations`` columns (as IDC's
``collections_index`` names them); otherwise they are read from the collections index bundled
with ``idc-index-data`` (offline, DuckDB). Collections the index does not know (e.g. the demo's
synthetic ones) get no terms, and a missing index only costs the caption those fields.
"""

from __future__ import annotations

import logging

import duckdb
import pandas as pd

log = logging.getLogger(__name__)

Terms = tuple[str | None, str | None]  # (cancer_types, tumor_locations), raw index text


def _text(value: object) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and value != value):
        return None
    return str(value).strip() or None


def index_terms(collection_ids: list[str]) -> dict[str, Terms]:
    """cancer_types and tumor_locations of collections from the bundled collections index."""
    if not collection_ids:
        return {}
    try:
        from idc_diffusion.cohort.idc_index import bundled_index

        path = str(bundled_index().collections)
        con = duckdb.connect()
        try:
            rows = con.execute(
                "SELECT collection_id, cancer_types, tumor_locations FROM read_parquet(?) "
                "WHERE collection_id IN (SELECT unnest(?))",
                [path, collection_ids],
            ).fetchall()
        finally:
            con.close()
    except Exception as exc:  # no index: captions simply lack disease/site
        log.warning("collections index unavailable (%s); captions get no disease/site", exc)
        return {}
    return {str(c): (_text(d), _text(s)) for c, d, s in rows}


def collection_terms(rows: pd.DataFrame) -> dict[str, Terms]:
    """collection_id -> (cancer types, tumour locations): row columns first, else the index."""
    if "collection_id" not in rows:
        return {}
    ids = sorted({str(c) for c in rows["collection_id"].dropna()})
    if {"cancer_types", "tumor_locations"} <= set(rows.columns):
        first = rows.drop_duplicates("collection_id").set_index("collection_id")
        return {
            str(c): (_text(first.at[c, "cancer_types"]), _text(first.at[c, "tumor_locations"]))
            for c in first.index
        }
    return index_terms(ids)
