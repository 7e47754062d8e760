"""Cohort selection: declarative strata evaluated on the IDC series index (DuckDB or BigQuery)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pandas as pd

from idc_diffusion.cohort.citations import citations_markdown, source_citations
from idc_diffusion.cohort.download_plan import check_budget, download_plan
from idc_diffusion.cohort.filter_sql import (
    BIGQUERY,
    DUCKDB,
    IMAGE_SOP_CLASSES,
    CohortSpecError,
    Step,
    license_counts_sql,
    rows_sql,
    selection_sql,
    step_counts_sql,
    stratum_steps,
    unknown_values,
)
from idc_diffusion.cohort.idc_index import (
    DuckDBIndex,
    IndexFiles,
    bundled_index,
    human_collections,
    idc_version,
    vocabulary,
)
from idc_diffusion.cohort.splits import assign_splits, patient_keys, shard_of

__all__ = ["IMAGE_SOP_CLASSES", "CohortSpecError", "EmptyCohortError", "select_strata"]

log = logging.getLogger(__name__)


class EmptyCohortError(ValueError):
    """A stratum whose filters match no series."""


class Backend(Protocol):
    """Runs the cohort SQL on a series-level table (see cohort_spec)."""

    name: str

    def source_sql(self) -> str: ...
    def columns(self) -> list[str]: ...
    def query(self, sql: str) -> pd.DataFrame: ...
    def close(self) -> None: ...


@dataclass
class StratumResult:
    """The series a stratum selected, what its filters removed, and the SQL that ran."""

    name: str
    selected: pd.DataFrame
    matched: int
    removed_by_license: dict[str, int] = field(default_factory=dict)
    sql: str = ""
    step_counts: list[tuple[str, int]] | None = None


def open_backend(settings: dict, files: IndexFiles, client: Any = None) -> Backend:
    """The configured backend; `client` injects a BigQuery client (tests, custom auth)."""
    if settings.get("backend", "duckdb") == "bigquery":
        from idc_diffusion.cohort.bigquery_backend import BigQueryIndex

        bq = settings.get("bigquery") or {}
        return BigQueryIndex(
            bq.get("dataset", "bigquery-public-data.idc_current"), bq.get("project"), client
        )
    return DuckDBIndex(files)


def step_counts(backend: Backend, steps: list[Step]) -> list[tuple[str, int]]:
    """Series left after each filter, starting with all series in the index."""
    row = backend.query(step_counts_sql(backend.source_sql(), steps)).iloc[0]
    names = ["all_series", *(s.name for s in steps)]
    return [(name, int(row.iloc[k] or 0)) for k, name in enumerate(names)]


def _select_stratum(
    backend: Backend,
    stratum: dict,
    settings: dict,
    seed: int,
    humans: list[str],
    taken: list[str],
    explain: bool,
) -> StratumResult:
    dialect = BIGQUERY if backend.name == "bigquery" else DUCKDB
    steps = stratum_steps(stratum, settings, humans, taken, dialect)
    source = backend.source_sql()
    licenses = backend.query(license_counts_sql(source, steps))
    by_license = {str(k): int(v) for k, v in zip(licenses["license"], licenses["n"], strict=True)}
    allowed = settings["license_allow"]
    removed = {k: v for k, v in sorted(by_license.items()) if k not in allowed}
    sql = selection_sql(source, steps, stratum, seed, dialect)
    selected = backend.query(sql)  # keys only; select_strata fetches the rows
    counts = step_counts(backend, steps) if explain or selected.empty else None
    return StratumResult(stratum["name"], selected, sum(by_license.values()), removed, sql, counts)


def select_strata(
    files: IndexFiles,
    settings: dict,
    seed: int,
    backend: Backend | None = None,
    explain: bool = False,
) -> list[StratumResult]:
    """Evaluate every stratum in config order; a series belongs to the first stratum taking it.

    Raises CohortSpecError for collections/body parts/modalities the index does not have
    (with the closest valid values) and EmptyCohortError naming the stratum and the filter
    that emptied it. With `explain`, every result carries the series count after each filter.
    """
    problems = unknown_values(settings["strata"], vocabulary(files))
    if problems:
        raise CohortSpecError("; ".join(problems))
    own = backend is None
    backend = backend or open_backend(settings, files)
    humans = human_collections(files)
    try:
        results: list[StratumResult] = []
        taken: list[str] = []
        for stratum in settings["strata"]:
            result = _select_stratum(backend, stratum, settings, seed, humans, taken, explain)
            if result.selected.empty:
                raise EmptyCohortError(_empty_message(stratum, result, settings))
            taken += list(result.selected["SeriesInstanceUID"])
            results.append(result)
        _fetch_rows(backend, results, taken)
        return results
    finally:
        if own:
            backend.close()


def _fetch_rows(backend: Backend, results: list[StratumResult], uids: list[str]) -> None:
    """Replace each result's keys by the full index rows, in the stratum's sample order."""
    dialect = BIGQUERY if backend.name == "bigquery" else DUCKDB
    columns = backend.columns()
    rows = backend.query(rows_sql(backend.source_sql(), columns, uids, dialect))
    rows = rows.set_index("SeriesInstanceUID", drop=False)
    for r in results:
        r.selected = rows.loc[list(r.selected["SeriesInstanceUID"]), columns].reset_index(drop=True)


def _empty_message(stratum: dict, result: StratumResult, settings: dict) -> str:
    counts = result.step_counts or []
    emptied = next((k for k, (_, n) in enumerate(counts) if n == 0), None)
    trail = ", ".join(f"{name}={n}" for name, n in counts)
    if emptied is None:
        why = "no series matched its filters"
    elif counts[emptied][0] == "license_allow":
        why = (
            f"{result.matched} series matched but their licenses "
            f"{sorted(result.removed_by_license)} are not in cohort.license_allow "
            f"{settings['license_allow']}"
        )
    else:
        name, _ = counts[emptied]
        why = f"no series matched: filter {name!r} left 0 of {counts[emptied - 1][1]} series"
    return (
        f"cohort.strata[{stratum['name']}] selects nothing: {why}. Series left after each "
        f"filter: {trail}. Loosen that filter or extend cohort.license_allow."
    )


def explain_text(results: list[StratumResult]) -> str:
    """The SQL each stratum ran and the series count after each of its filters."""
    lines = []
    for r in results:
        lines += [f"-- stratum {r.name}: selection SQL (keys)", r.sql + ";", ""]
        lines.append(f"-- stratum {r.name}: series left after each filter")
        for name, n in r.step_counts or []:
            lines.append(f"--   {name:<28} {n:>9}")
        lines.append(f"--   {'caps (per patient, stratum)':<28} {len(r.selected):>9}")
        if r.removed_by_license:
            lines.append(f"--   removed by license: {r.removed_by_license}")
        lines.append("")
    lines.append(
        "-- then the full rows of every selected series, in one query: SELECT <index columns> "
        "FROM series WHERE SeriesInstanceUID IN (<the keys above>)"
    )
    return "\n".join(lines)


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


def _by(frame: pd.DataFrame, column: str) -> dict[str, dict[str, Any]]:
    return {str(k): _counts(g) for k, g in frame.groupby(column, dropna=False)}


def cohort_summary(
    cohort: pd.DataFrame,
    results: list[StratumResult],
    files: IndexFiles,
    idc_version: int,
    n_shards: int,
    backend: str = "duckdb",
) -> dict[str, Any]:
    """Counts and sizes by stratum, split, modality and license, and the index release used."""
    by_stratum = {}
    removed_total: dict[str, int] = {}
    for r in results:
        part = cohort[cohort["stratum"] == r.name]
        by_stratum[r.name] = {
            **_counts(part),
            "matched_before_license_filter": r.matched,
            "removed_by_license": r.removed_by_license,
            "by_split": _by(part, "split"),
            "by_modality": _by(part, "Modality"),
        }
        for k, v in r.removed_by_license.items():
            removed_total[k] = removed_total.get(k, 0) + v
    return {
        "backend": backend,
        "idc_version": idc_version,
        "idc_index_data_version": files.package_version,
        "index_parquet": str(files.series),
        "n_shards": n_shards,
        "total": _counts(cohort),
        "by_split": _by(cohort, "split"),
        "by_stratum": by_stratum,
        "by_modality": _by(cohort, "Modality"),
        "by_license": _by(cohort, "license_short_name"),
        "removed_by_license": dict(sorted(removed_total.items())),
        "by_shard": {
            int(k): int(v) for k, v in cohort["shard"].value_counts().sort_index().items()
        },
        "licenses": {
            str(k): int(v) for k, v in cohort["license_short_name"].value_counts().items()
        },
    }


def run_cohort(
    settings: dict,
    seed: int,
    n_shards: int,
    out_dir: Path,
    client: Any = None,
    explain: bool = False,
) -> pd.DataFrame:
    """The cohort stage: cohort.parquet, CITATIONS.md, summary.json, download_plan.json.

    With `explain`, prints the SQL and the count after each filter and writes nothing.
    Raises DiskBudgetError (before writing anything) when the estimated download exceeds
    cohort.disk_budget_GB. `client` injects a BigQuery client for the bigquery backend.
    """
    files = bundled_index(settings.get("index_parquet"))
    version = idc_version(files)
    backend = open_backend(settings, files, client)
    try:
        results = select_strata(files, settings, seed, backend, explain=explain)
    finally:
        if client is None:
            backend.close()
    cohort = build_cohort(results, settings["split"], seed, n_shards)
    if explain:
        print(explain_text(results))
        return cohort
    plan = download_plan(cohort, n_shards)
    check_budget(plan, settings.get("disk_budget_GB"))
    out_dir.mkdir(parents=True, exist_ok=True)
    cohort.to_parquet(out_dir / "cohort.parquet", index=False)
    sources = source_citations(files.collections)
    (out_dir / "CITATIONS.md").write_text(citations_markdown(cohort, sources, version))
    summary = cohort_summary(cohort, results, files, version, n_shards, backend.name)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out_dir / "download_plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    log.info(
        "cohort: %d series, %d patients, %.3f GB to download, from IDC v%d (%s)",
        len(cohort),
        summary["total"]["patients"],
        plan["total"]["GB"],
        version,
        backend.name,
    )
    return cohort
