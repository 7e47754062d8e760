"""Cohort selection: declarative strata evaluated on the IDC series index with DuckDB."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from idc_diffusion.citations import citations_markdown, source_citations
from idc_diffusion.idc_index import IndexFiles, bundled_index, idc_version
from idc_diffusion.splits import assign_splits, patient_keys, shard_of

# Image storage SOP classes per modality; SR, SEG, RTSTRUCT, presentation states, raw data
# and secondary captures never enter a training cohort.
IMAGE_SOP_CLASSES: dict[str, tuple[str, ...]] = {
    "CT": ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"),
    "MR": ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.4.1"),
    "CR": ("1.2.840.10008.5.1.4.1.1.1",),
    "DX": ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.840.10008.5.1.4.1.1.1.1.1"),
    "MG": ("1.2.840.10008.5.1.4.1.1.1.2", "1.2.840.10008.5.1.4.1.1.1.2.1"),
}


log = logging.getLogger(__name__)


class EmptyCohortError(ValueError):
    """A stratum whose filters match no series."""


@dataclass
class StratumResult:
    """The series a stratum selected and what its filters removed."""

    name: str
    selected: pd.DataFrame
    matched: int
    removed_by_license: dict[str, int] = field(default_factory=dict)


def _stratum_where(stratum: dict, settings: dict) -> tuple[str, list[Any]]:
    """SQL predicate (without the license filter) and its parameters for one stratum."""
    sop_classes = [uid for m in stratum["modalities"] for uid in IMAGE_SOP_CLASSES[m]]
    clauses = ["list_contains(?, Modality)", "list_contains(?, SOPClassUID)", "instanceCount >= ?"]
    params: list[Any] = [stratum["modalities"], sop_classes, stratum["min_instances"]]
    if stratum["max_instances"] is not None:
        clauses.append("instanceCount <= ?")
        params.append(stratum["max_instances"])
    if stratum["body_parts"]:
        clauses.append("list_contains(?, upper(BodyPartExamined))")
        params.append([b.upper() for b in stratum["body_parts"]])
    if stratum["collections"]:
        clauses.append("list_contains(?, collection_id)")
        params.append(stratum["collections"])
    if settings["exclude_derived"]:
        clauses.append("analysis_result_id IS NULL")
    if settings["exclude_description_regex"]:
        clauses.append("NOT regexp_matches(coalesce(SeriesDescription, ''), ?)")
        params.append(settings["exclude_description_regex"])
    return " AND ".join(clauses), params


def _select_stratum(
    con: duckdb.DuckDBPyConnection, files: IndexFiles, stratum: dict, settings: dict, seed: int
) -> StratumResult:
    where, params = _stratum_where(stratum, settings)
    species = (
        "AND collection_id IN (SELECT collection_id FROM read_parquet(?) WHERE species = 'Human')"
        if settings["human_only"]
        else ""
    )
    species_params = [str(files.collections)] if settings["human_only"] else []
    con.execute(
        f"CREATE OR REPLACE TEMP TABLE candidates AS SELECT * FROM read_parquet(?) "
        f"WHERE {where} {species} AND SeriesInstanceUID NOT IN (SELECT uid FROM taken)",
        [str(files.series), *params, *species_params],
    )
    by_license = dict(
        con.execute("SELECT license_short_name, count(*) FROM candidates GROUP BY 1").fetchall()
    )
    allowed = settings["license_allow"]
    removed = {str(k): int(v) for k, v in by_license.items() if k not in allowed}
    # Seeded rank inside each patient, then a seeded order over the stratum: a larger cap
    # (per patient or per stratum) keeps every series a smaller cap chose.
    key = f"{seed}/{stratum['name']}/"
    per_patient = stratum["max_series_per_patient"]
    cap = stratum["max_series"]
    selected = con.execute(
        """
        SELECT * EXCLUDE (patient_rank, sample_key) FROM (
            SELECT *,
                   md5(? || SeriesInstanceUID) AS sample_key,
                   row_number() OVER (PARTITION BY collection_id, PatientID
                                      ORDER BY md5(? || SeriesInstanceUID)) AS patient_rank
            FROM candidates WHERE list_contains(?, license_short_name)
        )
        WHERE ? IS NULL OR patient_rank <= ?
        ORDER BY sample_key
        LIMIT coalesce(?, 9223372036854775807)
        """,
        [key, key, allowed, per_patient, per_patient, cap],
    ).df()
    return StratumResult(stratum["name"], selected, int(sum(by_license.values())), removed)


def select_strata(files: IndexFiles, settings: dict, seed: int) -> list[StratumResult]:
    """Evaluate every stratum in config order; a series belongs to the first stratum taking it.

    Raises EmptyCohortError naming the stratum when a stratum selects nothing.
    """
    con = duckdb.connect()
    try:
        con.execute("CREATE TEMP TABLE taken (uid VARCHAR)")
        results = []
        for stratum in settings["strata"]:
            result = _select_stratum(con, files, stratum, settings, seed)
            if result.selected.empty:
                raise EmptyCohortError(_empty_message(stratum, result))
            con.execute(
                "INSERT INTO taken SELECT unnest(?)", [list(result.selected["SeriesInstanceUID"])]
            )
            results.append(result)
        return results
    finally:
        con.close()


def _empty_message(stratum: dict, result: StratumResult) -> str:
    filters = {k: v for k, v in stratum.items() if v not in (None, [], "")}
    why = (
        f"{result.matched} series matched but their licenses {sorted(result.removed_by_license)} "
        "are not in cohort.license_allow"
        if result.matched
        else "no series matched its filters"
    )
    return (
        f"cohort.strata[{stratum['name']}] selects nothing: {why}. Filters: {filters}. "
        "Loosen the filters (check spelling of body parts and collection ids, upper case) "
        "or extend cohort.license_allow."
    )


def build_cohort(
    results: list[StratumResult], split: dict, seed: int, n_shards: int
) -> pd.DataFrame:
    """Concatenate strata and add `stratum`, patient-level `split` and `shard` columns."""
    frames = [r.selected.assign(stratum=r.name) for r in results]
    cohort = pd.concat(frames, ignore_index=True)
    keys = patient_keys(cohort)
    splits = assign_splits(keys, split, seed)
    cohort["split"] = keys.map(splits)
    cohort["shard"] = [shard_of(uid, n_shards) for uid in cohort["SeriesInstanceUID"]]
    order = {r.name: i for i, r in enumerate(results)}
    cohort = cohort.sort_values(
        ["stratum", "SeriesInstanceUID"], key=lambda c: c.map(order) if c.name == "stratum" else c
    )
    return cohort.reset_index(drop=True)


def _counts(frame: pd.DataFrame) -> dict[str, Any]:
    return {
        "series": len(frame),
        "patients": int(patient_keys(frame).nunique()) if len(frame) else 0,
        "instances": int(frame["instanceCount"].sum()),
        "size_MB": round(float(frame["series_size_MB"].sum()), 3),
    }


def cohort_summary(
    cohort: pd.DataFrame,
    results: list[StratumResult],
    files: IndexFiles,
    idc_version: int,
    n_shards: int,
) -> dict[str, Any]:
    """Counts and sizes by stratum and split, licenses, and the index release used."""
    by_stratum = {}
    for r in results:
        part = cohort[cohort["stratum"] == r.name]
        by_stratum[r.name] = {
            **_counts(part),
            "matched_before_license_filter": r.matched,
            "removed_by_license": r.removed_by_license,
            "by_split": {s: _counts(g) for s, g in part.groupby("split")},
        }
    return {
        "idc_version": idc_version,
        "idc_index_data_version": files.package_version,
        "index_parquet": str(files.series),
        "n_shards": n_shards,
        "total": _counts(cohort),
        "by_split": {s: _counts(g) for s, g in cohort.groupby("split")},
        "by_stratum": by_stratum,
        "by_shard": {
            int(k): int(v) for k, v in cohort["shard"].value_counts().sort_index().items()
        },
        "licenses": {
            str(k): int(v) for k, v in cohort["license_short_name"].value_counts().items()
        },
    }


def run_cohort(settings: dict, seed: int, n_shards: int, out_dir: Path) -> pd.DataFrame:
    """The cohort stage: cohort.parquet, CITATIONS.md and summary.json in `out_dir`."""
    files = bundled_index(settings["index_parquet"])
    version = idc_version(files)
    results = select_strata(files, settings, seed)
    cohort = build_cohort(results, settings["split"], seed, n_shards)
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort.to_parquet(out_dir / "cohort.parquet", index=False)
    sources = source_citations(files.collections)
    (out_dir / "CITATIONS.md").write_text(citations_markdown(cohort, sources, version))
    summary = cohort_summary(cohort, results, files, version, n_shards)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    log.info(
        "cohort: %d series, %d patients from IDC v%d",
        len(cohort),
        summary["total"]["patients"],
        version,
    )
    return cohort
