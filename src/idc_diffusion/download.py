"""The download stage: fetch (or synthesize) one shard's series, verify them, report.

Layout under ``shard_dir``::

    <SeriesInstanceUID>/*.dcm    verified series only (moved in when they pass)
    .partial/<SeriesInstanceUID>/  work in progress and series that failed verification
    .s5cmd/attempt-<n>.txt, .s5cmd/s5cmd.log   the command files and output of this run

A rerun keeps the verified folders, clears ``.partial`` and fetches only the rest.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion import s5cmd
from idc_diffusion.rows import cell
from idc_diffusion.synthetic import write_synthetic_series
from idc_diffusion.verify import STATUSES, SeriesCheck, verify_series

log = logging.getLogger(__name__)

SOURCES = ("idc", "synthetic")
PARTIAL = ".partial"
S5CMD_DIR = ".s5cmd"


def expected_count(row: Mapping[str, Any]) -> int | None:
    """The row's instanceCount as an int, or None when the index has none."""
    value = cell(row, "instanceCount")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def series_entry(row: Mapping[str, Any], check: SeriesCheck) -> dict[str, Any]:
    """One report line."""
    return {
        "SeriesInstanceUID": str(row["SeriesInstanceUID"]),
        "crdc_series_uuid": cell(row, "crdc_series_uuid"),
        "expected_instances": expected_count(row),
        "files": check.files,
        "bytes": check.bytes,
        "status": check.status,
        "reason": check.reason,
    }


def build_report(
    shard: int, source: str, rows: list[Mapping[str, Any]], checks: dict[str, SeriesCheck]
) -> dict[str, Any]:
    """The shard report, series in cohort order."""
    series = [series_entry(row, checks[str(row["SeriesInstanceUID"])]) for row in rows]
    counts = dict.fromkeys(STATUSES, 0)
    for entry in series:
        counts[entry["status"]] += 1
    return {
        "shard": int(shard),
        "source": source,
        "pixel_source": source,
        "series": series,
        "counts": counts,
        "bytes": sum(entry["bytes"] for entry in series),
    }


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def unique_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, one per SeriesInstanceUID (first wins)."""
    if rows.empty:
        return []
    return rows.drop_duplicates("SeriesInstanceUID").to_dict("records")


def promote(partial: Path, final: Path) -> None:
    """Move a verified series folder into place."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def finish(row: Mapping[str, Any], shard_dir: Path) -> SeriesCheck:
    """Verify the series' partial folder; move it into place when ok."""
    uid = str(row["SeriesInstanceUID"])
    partial = shard_dir / PARTIAL / uid
    check = verify_series(partial, uid, expected_count(row) or 0)
    if check.ok:
        promote(partial, shard_dir / uid)
    return check


def already_done(rows: list[dict[str, Any]], shard_dir: Path) -> dict[str, SeriesCheck]:
    """Checks of series whose final folder verifies ok; stale final folders are removed."""
    done = {}
    for row in rows:
        uid = str(row["SeriesInstanceUID"])
        final = shard_dir / uid
        if not final.exists():
            continue
        check = verify_series(final, uid, expected_count(row) or 0)
        if check.ok:
            done[uid] = check
        else:
            log.warning(
                "%s: existing folder fails verification (%s); refetching", uid, check.reason
            )
            shutil.rmtree(final)
    return done


def precheck(row: Mapping[str, Any], source: str) -> SeriesCheck | None:
    """A 'missing' result for rows that cannot be fetched at all, else None."""
    if expected_count(row) is None or expected_count(row) < 1:
        return SeriesCheck("missing", "index has no instanceCount for this series", 0, 0)
    if source == "idc" and not (cell(row, "aws_bucket") and cell(row, "crdc_series_uuid")):
        return SeriesCheck("missing", "index has no aws_bucket/crdc_series_uuid", 0, 0)
    return None


def synthesize(
    rows: list[dict[str, Any]], shard_dir: Path, synthetic: Mapping[str, Any]
) -> dict[str, SeriesCheck]:
    """Write phantom series into .partial, verify them and move them into place."""
    matrix, seed = int(synthetic.get("matrix", 128)), int(synthetic.get("seed", 0))
    checks = {}
    for row in rows:
        uid = str(row["SeriesInstanceUID"])
        try:
            write_synthetic_series(row, shard_dir / PARTIAL / uid, matrix=matrix, seed=seed)
        except Exception as exc:
            log.exception("%s: synthetic generation failed", uid)
            checks[uid] = SeriesCheck("missing", f"synthetic generation failed: {exc!r}", 0, 0)
            continue
        checks[uid] = finish(row, shard_dir)
    return checks


def fetch(
    rows: list[dict[str, Any]], shard_dir: Path, settings: Mapping[str, Any]
) -> dict[str, SeriesCheck]:
    """Download with s5cmd into .partial, verify, retry the failures, move the good ones."""
    binary = s5cmd.find_s5cmd()  # fail early and clearly
    log_dir = shard_dir / S5CMD_DIR
    checks: dict[str, SeriesCheck] = {}
    pending = rows
    attempts = 1 + max(int(settings.get("retries", 2)), 0)
    for attempt in range(attempts):
        if not pending:
            break
        jobs = []
        for row in pending:
            dest = shard_dir / PARTIAL / str(row["SeriesInstanceUID"])
            shutil.rmtree(dest, ignore_errors=True)  # a retry starts from an empty folder
            jobs.append(s5cmd.CopyJob(str(row["aws_bucket"]), str(row["crdc_series_uuid"]), dest))
        manifest = log_dir / f"attempt-{attempt}.txt"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(s5cmd.build_manifest(jobs))
        log.info("attempt %d: fetching %d series with %s", attempt, len(jobs), binary)
        s5cmd.run_manifest(
            manifest,
            settings.get("endpoint_url"),
            int(settings.get("s5cmd_workers", 16)),
            log_dir / "s5cmd.log",
        )
        for row in pending:
            checks[str(row["SeriesInstanceUID"])] = finish(row, shard_dir)
        pending = [row for row in pending if not checks[str(row["SeriesInstanceUID"])].ok]
    return checks


def download_shard(
    rows: pd.DataFrame, shard: int, shard_dir: Path, report_path: Path, settings: dict
) -> dict:
    """Fetch or synthesize the series of one shard into ``shard_dir``; write and return the report.

    Bad series are reported (never raised); setup problems (unknown source, no s5cmd
    binary) raise.
    """
    source = settings.get("source", "idc")
    if source not in SOURCES:
        raise ValueError(f"download.source must be one of {SOURCES}, got {source!r}")
    shard_dir = Path(shard_dir)
    records = unique_rows(rows)
    shard_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(shard_dir / PARTIAL, ignore_errors=True)
    shutil.rmtree(shard_dir / S5CMD_DIR, ignore_errors=True)

    checks = already_done(records, shard_dir)
    todo = []
    for row in records:
        uid = str(row["SeriesInstanceUID"])
        if uid in checks:
            continue
        bad = precheck(row, source)
        if bad is not None:
            checks[uid] = bad
        else:
            todo.append(row)
    log.info("shard %d: %d series verified earlier, %d to do", shard, len(checks), len(todo))
    if todo and source == "synthetic":
        checks.update(synthesize(todo, shard_dir, settings.get("synthetic") or {}))
    elif todo:
        checks.update(fetch(todo, shard_dir, settings))

    with contextlib.suppress(OSError):
        (shard_dir / PARTIAL).rmdir()  # only when empty: failed series stay for inspection
    report = build_report(shard, source, records, checks)
    write_json(Path(report_path), report)
    log.info("shard %d: %s, %d bytes", shard, report["counts"], report["bytes"])
    return report
