"""The download stage: fetch, link or synthesize one shard's series, verify them, report.

Layout under ``shard_dir``::

    <SeriesInstanceUID>/*.dcm    verified series only (moved in when they pass)
    .verified/<SeriesInstanceUID>.json   size, mtime and content hash of each file when verified
    .partial/<SeriesInstanceUID>/  work in progress and series that failed verification
    .s5cmd/attempt-<n>.txt   the command files of the latest run
    .s5cmd/s5cmd.log         s5cmd's output, appended by every run (failed attempts stay)

s5cmd writes each object into ``.partial``; a series is verified and moved into place as
soon as all its files have landed, while the rest of the shard downloads. A rerun (after a
failure, a kill or a SLURM time limit) keeps the verified folders and ``.partial``: files
there are checked, bad ones and s5cmd's temporary files removed, and s5cmd
(``cp --if-size-differ``) fetches only the objects still missing. A series found verified
in another shard's folder (``n_shards`` changed) is hard-linked in, not fetched again.

Each ``ok`` series carries a content digest in the report (over its files' hashes, taken while
verifying): prepare depends on the report, never on the DICOM files themselves.

Sources: ``idc`` (s5cmd from IDC's buckets on AWS, Google Cloud Storage or a mirror),
``local`` (DICOM already on disk under ``local_root``, hard-linked in) and ``synthetic``
(phantom pixels for the demo and tests). All three go through the same verification.

When more than ``max_failed_fraction`` of the shard's series are not ``ok`` the report is
written to ``shard-K.failed.json`` instead of ``shard-K.json`` (the rule's output), and
:class:`DownloadFailed` is raised: the job fails, the workflow stops, and a rerun resumes.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import re
import shutil
import signal
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.core.progress import Progress
from idc_diffusion.core.rows import cell
from idc_diffusion.download import local_source, s5cmd
from idc_diffusion.download.expected import expected_bytes, expected_count
from idc_diffusion.download.fetch import fetch
from idc_diffusion.download.report import (
    build_report,
    failed_report_path,
    failure_summary,
    write_json,
)
from idc_diffusion.download.staging import PARTIAL, adopt_moved, already_done, finish
from idc_diffusion.download.synthetic import write_synthetic_series
from idc_diffusion.download.verify import SeriesCheck

log = logging.getLogger(__name__)

SOURCES = ("idc", "local", "synthetic")
LOCAL_INDEX = "local_index.parquet"  # beside the shard folders, shared by all shards
SERIES_UID_RE = re.compile(r"^[0-9][0-9.]{0,127}$")  # also a safe folder name
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


class DownloadFailed(RuntimeError):
    """More of the shard failed than ``download.max_failed_fraction`` allows."""


class DownloadInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the download (s5cmd stopped, what landed verified)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Within the block, SIGINT and SIGTERM (Ctrl-C, scancel, a SLURM time limit) raise
    :class:`DownloadInterrupted` in the main thread."""

    def interrupt(signum: int, frame: object) -> None:
        raise DownloadInterrupted(signum)

    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def unique_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as dicts, one per SeriesInstanceUID (first wins)."""
    if rows.empty:
        return []
    return rows.drop_duplicates("SeriesInstanceUID").to_dict("records")


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


def synthesize(
    rows: list[dict[str, Any]], shard_dir: Path, settings: Mapping[str, Any], progress: Progress
) -> dict[str, SeriesCheck]:
    """Write phantom series into .partial, verify them and move them into place."""
    synthetic = settings.get("synthetic") or {}
    matrix, seed = int(synthetic.get("matrix", 128)), int(synthetic.get("seed", 0))
    checks = {}
    for row in rows:
        uid = str(row["SeriesInstanceUID"])
        partial = shard_dir / PARTIAL / uid
        shutil.rmtree(partial, ignore_errors=True)
        try:
            write_synthetic_series(row, partial, matrix=matrix, seed=seed)
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


def get_series(
    rows: list[dict[str, Any]],
    shard: int,
    shard_dir: Path,
    source: str,
    settings: Mapping[str, Any],
) -> dict[str, SeriesCheck]:
    """Checks of the (prechecked) rows: verified earlier, or fetched, linked or synthesized
    now."""
    shard_dir.mkdir(parents=True, exist_ok=True)
    checks = already_done(rows, shard_dir)
    moved = adopt_moved([r for r in rows if str(r["SeriesInstanceUID"]) not in checks], shard_dir)
    checks.update(moved)
    todo = [row for row in rows if str(row["SeriesInstanceUID"]) not in checks]
    log.info(
        "shard %d: %d series verified earlier (%d of them in another shard's folder), %d to do",
        shard,
        len(checks),
        len(moved),
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
    return checks


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
    checks = {}
    valid = []
    for row in records:
        bad = precheck(row, source)
        if bad is None:
            valid.append(row)
        else:
            checks[str(row["SeriesInstanceUID"])] = bad
            log.warning("%s: %s", row["SeriesInstanceUID"], bad.reason)
    try:
        checks.update(get_series(valid, shard, shard_dir, source, settings))
    except OSError as exc:  # disk full, read-only folder: every unfinished series says so
        if exc.errno not in STORAGE_ERRNOS:
            raise
        cause = f"{s5cmd.error_cause(exc.strerror or '')}: {exc}"
        log.error("shard %d: %s", shard, cause)
        with contextlib.suppress(OSError):
            checks.update(already_done(valid, shard_dir))  # promoted before the error
        for row in valid:
            checks.setdefault(str(row["SeriesInstanceUID"]), SeriesCheck("missing", cause, 0, 0))

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
