"""The download stage: fetch, link or synthesize one shard's series, verify them, report.

Layout under ``shard_dir``::

    <SeriesInstanceUID>/*.dcm    verified series only (moved in when they pass)
    .verified/<SeriesInstanceUID>.json   size and mtime of each file when it was verified
    .partial/<SeriesInstanceUID>/  work in progress and series that failed verification
    .s5cmd/attempt-<n>.txt, .s5cmd/s5cmd.log   the command files and output of this run

A rerun keeps the verified folders, clears ``.partial`` and fetches only the rest.

Sources: ``idc`` (s5cmd from IDC's buckets on AWS, Google Cloud Storage or a mirror),
``local`` (DICOM already on disk under ``local_root``, hard-linked in) and ``synthetic``
(phantom pixels for the demo and tests). All three go through the same verification.

When more than ``max_failed_fraction`` of the shard's series are not ``ok`` the report is
written to ``shard-K.failed.json`` instead of ``shard-K.json`` (the rule's output), and
:class:`DownloadFailed` is raised: the job fails, the workflow stops, and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion import local_source, s5cmd
from idc_diffusion.progress import Progress
from idc_diffusion.rows import cell
from idc_diffusion.synthetic import write_synthetic_series
from idc_diffusion.verify import (
    STATUSES,
    KnownFiles,
    SeriesCheck,
    check_file,
    series_files,
    verify_series,
)

log = logging.getLogger(__name__)

SOURCES = ("idc", "local", "synthetic")
PARTIAL = ".partial"
S5CMD_DIR = ".s5cmd"
VERIFIED = ".verified"  # <uid>.json per verified series: file name -> [size, mtime_ns]
LOCAL_INDEX = "local_index.parquet"  # beside the shard folders, shared by all shards
SERIES_UID_RE = re.compile(r"^[0-9][0-9.]{0,127}$")  # also a safe folder name
MAX_LISTED_FAILURES = 10
CHECK_BATCH = 32  # landed files per verification task: waking the thread per file costs more


class DownloadFailed(RuntimeError):
    """More of the shard failed than ``download.max_failed_fraction`` allows."""


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


def stamp(folder: Path) -> dict[str, list[int]]:
    """name -> [size, mtime_ns] of a series folder's files."""
    return {name: [st.st_size, st.st_mtime_ns] for name, st in series_files(folder).items()}


def stamp_path(final: Path) -> Path:
    """Where the stamp of the series folder ``final`` is kept."""
    return final.parent / VERIFIED / f"{final.name}.json"


def promote(partial: Path, final: Path) -> None:
    """Move a verified series folder into place, with a stamp of what was verified."""
    write_json(stamp_path(final), {"files": stamp(partial)})
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def stamped(folder: Path) -> KnownFiles:
    """Files of ``folder`` unchanged (size and mtime) since it was verified: known good."""
    try:
        recorded = json.loads(stamp_path(folder).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    now = stamp(folder)
    return {name: (now[name][0], None) for name in now if recorded.get(name) == now[name]}


def already_done(rows: list[dict[str, Any]], shard_dir: Path) -> dict[str, SeriesCheck]:
    """Checks of series whose final folder verifies ok; stale final folders are removed.

    Files unchanged since their verification (the folder's stamp) are not read again.
    """
    done = {}
    for row in rows:
        uid = str(row["SeriesInstanceUID"])
        final = shard_dir / uid
        if not final.exists():
            continue
        check = verify_series(final, uid, expected_count(row) or 0, stamped(final))
        if check.ok:
            done[uid] = check
        else:
            log.warning(
                "%s: existing folder fails verification (%s); refetching", uid, check.reason
            )
            shutil.rmtree(final)
    return done


def precheck(row: Mapping[str, Any], source: str) -> SeriesCheck | None:
    """A 'missing' result for rows that must not or cannot be fetched, else None.

    Runs before any path, command or manifest line is built from the row.
    """
    uid = row.get("SeriesInstanceUID")
    if not isinstance(uid, str) or not SERIES_UID_RE.fullmatch(uid):
        return SeriesCheck("missing", f"rejected: SeriesInstanceUID {uid!r} is not a UID", 0, 0)
    count = expected_count(row)
    if count is None or count < 1:
        return SeriesCheck("missing", "index has no instanceCount for this series", 0, 0)
    if source == "idc":
        problem = s5cmd.source_problem(cell(row, "aws_bucket"), cell(row, "crdc_series_uuid"))
        if problem:
            return SeriesCheck("missing", f"rejected: {problem}", 0, 0)
    return None


def expected_bytes(rows: list[dict[str, Any]]) -> int | None:
    """Sum of the index's series sizes (for progress), or None when unknown."""
    sizes = [cell(row, "series_size_MB") for row in rows]
    known = [float(s) for s in sizes if isinstance(s, int | float)]
    return int(sum(known) * 1e6) if known else None


def finish(row: Mapping[str, Any], shard_dir: Path, known: KnownFiles | None = None) -> SeriesCheck:
    """Verify the series' partial folder (files in ``known`` with unchanged size are not
    read again); move the folder into place when ok."""
    uid = str(row["SeriesInstanceUID"])
    partial = shard_dir / PARTIAL / uid
    check = verify_series(partial, uid, expected_count(row) or 0, known)
    if check.ok:
        promote(partial, shard_dir / uid)
    return check


def check_batch(
    landed: list[tuple[str, str, str]], progress: Progress
) -> list[tuple[str, str, int, str | None]]:
    """(series UID, file name, size, problem) of files just written by s5cmd, given as
    (path, series UID, file name); their bytes count as done. Files that vanished are left
    out (verify_series sees that too)."""
    results = []
    for path, uid, name in landed:
        with contextlib.suppress(OSError):
            size = os.stat(path).st_size
            results.append((uid, name, size, check_file(path, uid)))
            progress.add_bytes(size)
    return results


def synthesize(
    rows: list[dict[str, Any]], shard_dir: Path, settings: Mapping[str, Any], progress: Progress
) -> dict[str, SeriesCheck]:
    """Write phantom series into .partial, verify them and move them into place."""
    synthetic = settings.get("synthetic") or {}
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
        progress.add_bytes(checks[uid].bytes)
        progress.series_done()
    return checks


def link_local(
    rows: list[dict[str, Any]], shard_dir: Path, settings: Mapping[str, Any], progress: Progress
) -> dict[str, SeriesCheck]:
    """Link the series' files from ``local_root`` into .partial, verify, move into place."""
    root = settings.get("local_root")
    if not root:
        raise ValueError("download.source: local needs download.local_root (the DICOM folder)")
    index = local_source.local_index(Path(root), shard_dir.parent / LOCAL_INDEX)
    checks = {}
    for row in rows:
        uid = str(row["SeriesInstanceUID"])
        partial = shard_dir / PARTIAL / uid
        shutil.rmtree(partial, ignore_errors=True)
        if local_source.link_series(index, uid, partial) == 0:
            checks[uid] = SeriesCheck("missing", f"no DICOM file of this series under {root}", 0, 0)
            continue
        checks[uid] = finish(row, shard_dir)
        progress.add_bytes(checks[uid].bytes)
        progress.series_done()
    return checks


def run_attempt(
    rows: list[dict[str, Any]],
    shard_dir: Path,
    manifest: Path,
    settings: Mapping[str, Any],
    endpoint: str,
    progress: Progress,
) -> dict[str, SeriesCheck]:
    """One s5cmd run over ``manifest``. Files are checked as s5cmd reports them written, in
    batches of CHECK_BATCH (in a worker thread, while the rest downloads); the series check
    afterwards reuses those results for files whose size has not changed."""
    by_uid = {str(row["SeriesInstanceUID"]): row for row in rows}
    batches: list[Future] = []
    pending: list[tuple[str, str, str]] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:

        def submit_pending() -> None:
            batches.append(pool.submit(check_batch, pending.copy(), progress))
            pending.clear()

        def on_copied(path: str) -> None:
            folder, name = os.path.split(path)
            uid = os.path.basename(folder)
            if uid in by_uid:
                pending.append((path, uid, name))
                if len(pending) >= CHECK_BATCH:
                    submit_pending()

        s5cmd.run_manifest(
            manifest,
            endpoint,
            int(settings.get("s5cmd_workers", 16)),
            shard_dir / S5CMD_DIR / "s5cmd.log",
            retry_count=int(settings.get("s5cmd_retry_count", 3)),
            on_copied=on_copied,
        )
        submit_pending()
        known: dict[str, dict[str, tuple[int, str | None]]] = {uid: {} for uid in by_uid}
        for batch in batches:  # in landing order: a file written twice keeps its last check
            for uid, name, size, problem in batch.result():
                known[uid][name] = (size, problem)
        checks = {}
        for uid, row in by_uid.items():
            checks[uid] = finish(row, shard_dir, known[uid])
            if checks[uid].ok:
                progress.series_done()
    return checks


def fetch(
    rows: list[dict[str, Any]], shard_dir: Path, settings: Mapping[str, Any], progress: Progress
) -> dict[str, SeriesCheck]:
    """Download with s5cmd into .partial, verify, retry the failures with backoff."""
    binary = s5cmd.find_s5cmd()  # fail early and clearly
    provider = settings.get("provider", "aws")
    endpoint = s5cmd.resolve_endpoint(provider, settings.get("endpoint_url"))
    log_dir = shard_dir / S5CMD_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    checks: dict[str, SeriesCheck] = {}
    pending = rows
    attempts = 1 + max(int(settings.get("retries", 2)), 0)
    backoff = float(settings.get("retry_backoff_s", 5.0))
    for attempt in range(attempts):
        if not pending:
            break
        if attempt and backoff > 0:
            wait = backoff * 2 ** (attempt - 1)
            log.info(
                "attempt %d: %d series failed; retrying in %.1f s", attempt, len(pending), wait
            )
            time.sleep(wait)
        jobs = []
        for row in pending:
            dest = shard_dir / PARTIAL / str(row["SeriesInstanceUID"])
            shutil.rmtree(dest, ignore_errors=True)  # a retry starts from an empty folder
            bucket = s5cmd.provider_bucket(provider, str(row["aws_bucket"]))
            jobs.append(s5cmd.CopyJob(bucket, str(row["crdc_series_uuid"]), dest))
        manifest = log_dir / f"attempt-{attempt}.txt"
        manifest.write_text(s5cmd.build_manifest(jobs))
        log.info(
            "attempt %d: fetching %d series from %s with %s", attempt, len(jobs), endpoint, binary
        )
        checks.update(run_attempt(pending, shard_dir, manifest, settings, endpoint, progress))
        pending = [row for row in pending if not checks[str(row["SeriesInstanceUID"])].ok]
    return checks


def failure_summary(report: Mapping[str, Any], max_fraction: float) -> str | None:
    """Why the shard as a whole failed (too many series not ``ok``), or None."""
    series = report["series"]
    bad = [entry for entry in series if entry["status"] != "ok"]
    if not series or len(bad) / len(series) <= max_fraction:
        return None
    counts = ", ".join(f"{k} {v}" for k, v in report["counts"].items() if k != "ok" and v)
    lines = [
        f"shard {report['shard']}: {len(bad)} of {len(series)} series not ok "
        f"({len(bad) / len(series):.1%} > download.max_failed_fraction {max_fraction:.1%}): "
        f"{counts}"
    ]
    lines += [
        f"  {e['SeriesInstanceUID']}: {e['status']}: {e['reason']}"
        for e in bad[:MAX_LISTED_FAILURES]
    ]
    if len(bad) > MAX_LISTED_FAILURES:
        lines.append(f"  ... and {len(bad) - MAX_LISTED_FAILURES} more")
    return "\n".join(lines)


def failed_report_path(report_path: Path) -> Path:
    """``shard-3.json`` -> ``shard-3.failed.json``: where a failed shard's report goes."""
    return report_path.with_name(report_path.stem + ".failed" + report_path.suffix)


def download_shard(
    rows: pd.DataFrame, shard: int, shard_dir: Path, report_path: Path, settings: dict
) -> dict:
    """Fetch, link or synthesize the series of one shard into ``shard_dir``; write and
    return the report.

    Bad series are reported, not raised. Raises ValueError/FileNotFoundError for setup
    problems (unknown source, no s5cmd, bad endpoint settings) and :class:`DownloadFailed`
    (after writing ``shard-K.failed.json``) when too many series failed.
    """
    source = settings.get("source", "idc")
    if source not in SOURCES:
        raise ValueError(f"download.source must be one of {SOURCES}, got {source!r}")
    if source == "idc":
        s5cmd.resolve_endpoint(settings.get("provider", "aws"), settings.get("endpoint_url"))
    shard_dir, report_path = Path(shard_dir), Path(report_path)
    records = unique_rows(rows)
    shard_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(shard_dir / PARTIAL, ignore_errors=True)
    shutil.rmtree(shard_dir / S5CMD_DIR, ignore_errors=True)

    checks = {}
    valid = []
    for row in records:
        bad = precheck(row, source)
        if bad is None:
            valid.append(row)
        else:
            checks[str(row["SeriesInstanceUID"])] = bad
            log.warning("%s: %s", row["SeriesInstanceUID"], bad.reason)
    done = already_done(valid, shard_dir)
    checks.update(done)
    todo = [row for row in valid if str(row["SeriesInstanceUID"]) not in done]
    log.info(
        "shard %d: %d series verified earlier, %d rejected, %d to do",
        shard,
        len(done),
        len(records) - len(valid),
        len(todo),
    )
    if todo:
        interval = float(settings.get("progress_interval_s", 10.0))
        expected = None if source == "synthetic" else expected_bytes(todo)  # phantoms are smaller
        with Progress(f"shard {shard}", len(todo), expected, interval) as progress:
            if source == "synthetic":
                checks.update(synthesize(todo, shard_dir, settings, progress))
            elif source == "local":
                checks.update(link_local(todo, shard_dir, settings, progress))
            else:
                checks.update(fetch(todo, shard_dir, settings, progress))

    with contextlib.suppress(OSError):
        (shard_dir / PARTIAL).rmdir()  # only when empty: failed series stay for inspection
    report = build_report(shard, source, records, checks)
    log.info("shard %d: %s, %d bytes", shard, report["counts"], report["bytes"])
    failed_path = failed_report_path(report_path)
    summary = failure_summary(report, float(settings.get("max_failed_fraction", 0.05)))
    if summary:
        write_json(failed_path, report)
        report_path.unlink(missing_ok=True)
        raise DownloadFailed(f"{summary}\nfull report: {failed_path}")
    write_json(report_path, report)
    failed_path.unlink(missing_ok=True)
    return report
