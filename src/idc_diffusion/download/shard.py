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
import json
import logging
import os
import re
import shutil
import signal
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.core.progress import Progress
from idc_diffusion.core.rows import cell
from idc_diffusion.download import local_source, s5cmd
from idc_diffusion.download.synthetic import write_synthetic_series
from idc_diffusion.download.verify import (
    STATUSES,
    FileCheck,
    KnownFiles,
    ListedFiles,
    SeriesCheck,
    check_file,
    is_temporary,
    series_files,
    verify_series,
)

log = logging.getLogger(__name__)

SOURCES = ("idc", "local", "synthetic")
PARTIAL = ".partial"
S5CMD_DIR = ".s5cmd"
ORIGIN = ".crdc_series_uuid"  # in a partial folder: the series version its files came from
VERIFIED = (
    ".verified"  # <uid>.json per verified series: file name -> [size, mtime_ns, content hash]
)
LOCAL_INDEX = "local_index.parquet"  # beside the shard folders, shared by all shards
SERIES_UID_RE = re.compile(r"^[0-9][0-9.]{0,127}$")  # also a safe folder name
MAX_LISTED_FAILURES = 10
CHECK_BATCH = 32  # landed files per verification task: waking the thread per file costs more
DEFAULT_STALL_S = 300.0
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


def expected_count(row: Mapping[str, Any]) -> int | None:
    """The row's instanceCount as an int, or None when the index has none."""
    value = cell(row, "instanceCount")
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def listed_files(row: Mapping[str, Any]) -> ListedFiles | None:
    """name -> (size, MD5) of the series' objects when the cohort carries them
    (``instance_files``: ``<crdc_instance_uuid>.dcm <instance_size> <instance_hash>`` per
    instance, ``;``-separated; BigQuery cohorts), else None (also when it does not list
    every instance: CONCAT drops instances whose size or hash is NULL)."""
    text = cell(row, "instance_files")
    if not isinstance(text, str) or not text:
        return None
    listed = {}
    for item in text.split(";"):
        name, size, md5 = item.split(" ")
        listed[name] = (int(size), md5)
    return listed if len(listed) == expected_count(row) else None  # else: rows lack a hash


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
        # what prepare's rerun decision rests on: changes exactly when the series' bytes do
        "digest": check.digest,
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


def promote(partial: Path, final: Path, hashes: Mapping[str, str]) -> None:
    """Move a verified series folder into place, with a stamp of what was verified (each
    file's size, mtime and content hash)."""
    files = {name: [*st, hashes[name]] for name, st in stamp(partial).items()}
    write_json(stamp_path(final), {"files": files})
    (partial / ORIGIN).unlink(missing_ok=True)
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)


def stamped(folder: Path) -> KnownFiles:
    """Files of ``folder`` unchanged (size and mtime) since it was verified: known good, with
    the content hash recorded then. Any other file (edited, or an older stamp) is read."""
    try:
        recorded = json.loads(stamp_path(folder).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    now = stamp(folder)  # distinct instances were counted when the stamp was written
    return {
        name: (size, FileCheck(None, None, str(recorded[name][2])))
        for name, (size, mtime) in now.items()
        if len(recorded.get(name) or ()) == 3 and recorded[name][:2] == [size, mtime]
    }


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
        check = verify_series(
            final, uid, expected_count(row) or 0, stamped(final), listed_files(row)
        )
        if check.ok:
            done[uid] = check
        else:
            log.warning(
                "%s: existing folder fails verification (%s); refetching", uid, check.reason
            )
            shutil.rmtree(final)
    return done


def adopt_moved(rows: list[dict[str, Any]], shard_dir: Path) -> dict[str, SeriesCheck]:
    """Checks of series found verified in another shard's folder (``n_shards`` changed):
    their files are hard-linked in (no byte copied or fetched), verified from that folder's
    stamp without reading them, and the stale copy is removed."""
    others = [d for d in sorted(shard_dir.parent.glob("shard-*")) if d.is_dir() and d != shard_dir]
    checks = {}
    for row in rows:
        uid = str(row["SeriesInstanceUID"])
        source = next((d / uid for d in others if (d / uid).is_dir()), None)
        if source is None or (shard_dir / uid).exists():
            continue
        known = stamped(source)
        partial = shard_dir / PARTIAL / uid
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        try:
            for name in series_files(source):
                os.link(source / name, partial / name)
        except OSError as exc:  # another file system, or no hard links: fetch it instead
            log.warning("%s: cannot link it from %s (%s); fetching it", uid, source, exc)
            shutil.rmtree(partial)
            continue
        check = finish(row, shard_dir, known)
        if not check.ok:
            log.warning("%s: the copy in %s fails verification (%s)", uid, source, check.reason)
            shutil.rmtree(partial)
            continue
        shutil.rmtree(source)
        stamp_path(source).unlink(missing_ok=True)
        log.info("%s: linked from %s (the shard count changed)", uid, source.parent.name)
        checks[uid] = check
    return checks


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
    check = verify_series(partial, uid, expected_count(row) or 0, known, listed_files(row))
    if check.ok:
        try:
            promote(partial, shard_dir / uid, check.hashes)
        except OSError as exc:  # e.g. no room for its stamp: it stays in .partial
            cause = s5cmd.error_cause(exc.strerror or "")
            return SeriesCheck("incomplete", f"{cause}: {exc}", check.files, check.bytes)
    return check


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


def demote(final: Path, partial: Path) -> None:
    """Move a promoted series' files back into its partial folder (more of its objects
    landed after it was promoted) and drop its stamp."""
    partial.mkdir(parents=True, exist_ok=True)
    for name in series_files(final):
        if not (partial / name).exists():
            os.replace(final / name, partial / name)
    shutil.rmtree(final)
    stamp_path(final).unlink(missing_ok=True)


@dataclass
class Landed:
    """The checks of the files in the partial folders of the series being fetched, and the
    bytes they count in progress (a file re-fetched replaces its count, never adds to it)."""

    progress: Progress
    known: dict[str, dict[str, tuple[int, FileCheck]]] = field(default_factory=dict)

    def record(self, uid: str, name: str, size: int, check: FileCheck) -> None:
        old = self.known.setdefault(uid, {}).get(name)
        self.known[uid][name] = (size, check)
        self.progress.add_bytes(size - (old[0] if old else 0))

    def forget(self, uid: str, name: str) -> None:
        old = self.known.get(uid, {}).pop(name, None)
        if old:
            self.progress.add_bytes(-old[0])


def safe_check(path: str, uid: str, listed: ListedFiles | None, name: str) -> FileCheck:
    """:func:`check_file` that turns any exception into the file's problem: one odd file
    must not stop the shard."""
    try:
        return check_file(path, uid, listed.get(name) if listed else None)
    except Exception as exc:
        return FileCheck(None, f"{name}: unreadable ({type(exc).__name__}: {exc})")


def tidy_partial(row: Mapping[str, Any], shard_dir: Path, landed: Landed) -> None:
    """Before an attempt: remove s5cmd's temporary files and files that failed their check
    from the series' partial folder, and check files landed by an earlier run (the whole
    folder goes when it was fetched from another crdc_series_uuid: another IDC version)."""
    uid = str(row["SeriesInstanceUID"])
    partial = shard_dir / PARTIAL / uid
    origin = partial / ORIGIN
    with contextlib.suppress(FileNotFoundError):
        if origin.read_text() != row["crdc_series_uuid"]:  # another version of the series
            shutil.rmtree(partial)
    partial.mkdir(parents=True, exist_ok=True)
    origin.write_text(row["crdc_series_uuid"])
    with contextlib.suppress(FileNotFoundError), os.scandir(partial) as scan:
        for entry in scan:
            if is_temporary(entry.name):
                os.unlink(entry.path)
    files = series_files(partial)
    known = landed.known.setdefault(uid, {})
    for name in [n for n in known if n not in files]:
        landed.forget(uid, name)
    listed = listed_files(row)
    for name, st in files.items():
        if name not in known or known[name][0] != st.st_size:
            path = os.path.join(partial, name)
            landed.record(uid, name, st.st_size, safe_check(path, uid, listed, name))
        if known[name][1].problem is not None:
            os.unlink(partial / name)
            landed.forget(uid, name)


class Attempt:
    """One s5cmd run over some series. Files are checked as s5cmd reports them written, in
    batches of CHECK_BATCH in a worker thread while the rest downloads; a series is verified
    and moved into place as soon as all its files have landed."""

    def __init__(
        self,
        rows: list[dict[str, Any]],
        shard_dir: Path,
        landed: Landed,
        progress: Progress,
    ) -> None:
        self.by_uid = {str(row["SeriesInstanceUID"]): row for row in rows}
        self.listed = {uid: listed_files(row) for uid, row in self.by_uid.items()}
        self.shard_dir, self.landed, self.progress = shard_dir, landed, progress
        self.checks: dict[str, SeriesCheck] = {}
        self.late: set[str] = set()  # promoted, then another of its objects came
        self.pending: list[tuple[str, str, str]] = []

    def try_finish(self, uid: str) -> None:
        """Verify and promote the series if all its files are there (nothing else)."""
        row = self.by_uid[uid]
        have = len(self.landed.known.get(uid, {}))
        if uid in self.checks or have < (expected_count(row) or 0):
            return
        check = finish(row, self.shard_dir, self.landed.known[uid])
        if check.ok:
            self.checks[uid] = check
            self.progress.series_done()

    def overfull(self, uid: str) -> SeriesCheck:
        """Demote a promoted series whose prefix held more objects than the index has
        instances (one landed, or failed to land, after the promotion): not ok, and no
        retry can make it so."""
        self.progress.series_done(-1)
        partial = self.shard_dir / PARTIAL / uid
        demote(self.shard_dir / uid, partial)
        row = self.by_uid[uid]
        expected = expected_count(row) or 0
        check = verify_series(partial, uid, expected, self.landed.known.get(uid), self.listed[uid])
        reason = check.reason or (
            f"the bucket holds more objects than the index's {expected} instances"
        )
        return SeriesCheck("incomplete", reason, check.files, check.bytes)

    def check_batch(self, batch: list[tuple[str, str, str]]) -> None:
        """(path, series UID, file name) of files just written by s5cmd: check them, then
        finish the series they complete. Files that vanished are left out."""
        touched = set()
        for path, uid, name in batch:
            if uid in self.checks:
                self.late.add(uid)
                continue
            with contextlib.suppress(OSError):
                size = os.stat(path).st_size
                self.landed.record(uid, name, size, safe_check(path, uid, self.listed[uid], name))
                touched.add(uid)
        for uid in touched:
            self.try_finish(uid)

    def run(self, manifest: Path, settings: Mapping[str, Any], endpoint: str) -> s5cmd.RunResult:
        """Run s5cmd on ``manifest``; afterwards verify the series not finished yet."""
        batches: list[Future] = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify") as pool:

            def submit_pending() -> None:
                batches.append(pool.submit(self.check_batch, self.pending.copy()))
                self.pending.clear()

            def on_copied(path: str) -> None:
                folder, name = os.path.split(path)
                uid = os.path.basename(folder)
                if uid in self.by_uid:
                    self.pending.append((path, uid, name))
                    if len(self.pending) >= CHECK_BATCH:
                        submit_pending()

            try:
                result = s5cmd.run_manifest(
                    manifest,
                    endpoint,
                    int(settings.get("s5cmd_workers", 16)),
                    self.shard_dir / S5CMD_DIR / "s5cmd.log",
                    retry_count=int(settings.get("s5cmd_retry_count", 3)),
                    on_copied=on_copied,
                    stall_s=float(settings.get("stall_timeout_s", DEFAULT_STALL_S)) or None,
                )
            finally:
                submit_pending()  # what landed is checked (and promoted) even on an interrupt
        for batch in batches:
            batch.result()  # raise what went wrong in the worker
        errors = series_causes(result, list(self.by_uid.values()))
        self.late |= {uid for uid, found in errors.items() if uid in self.checks and found}
        for uid in self.late:  # another object came after the series was promoted
            self.checks[uid] = self.overfull(uid)
        for uid, row in self.by_uid.items():
            if uid not in self.checks:
                self.checks[uid] = finish(row, self.shard_dir, self.landed.known.get(uid))
                if self.checks[uid].ok:
                    self.progress.series_done()
        return result


def series_causes(result: s5cmd.RunResult, rows: list[dict[str, Any]]) -> dict[str, set[str]]:
    """Series UID -> transport causes of the s5cmd errors about its objects in one run."""
    by_uuid = {str(row["crdc_series_uuid"]): str(row["SeriesInstanceUID"]) for row in rows}
    causes: dict[str, set[str]] = {}
    for line in result.errors:
        found = s5cmd.error_source(line)
        if found:
            url, cause = found
            uid = by_uuid.get(url.split("/")[3]) if url.count("/") >= 3 else None
            if uid:
                causes.setdefault(uid, set()).add(cause)
    if result.stalled_s:
        for row in rows:
            causes.setdefault(str(row["SeriesInstanceUID"]), set()).add("stalled")
    return causes


def cause_text(cause: str, attempts: int, settings: Mapping[str, Any]) -> str:
    """``HTTP 503 SlowDown after 6 attempts``, ``stalled: nothing landed for 300 s ...``."""
    if cause == "stalled":
        stall = float(settings.get("stall_timeout_s", DEFAULT_STALL_S))
        return f"stalled: nothing landed for {stall:g} s, in {attempts} attempts"
    tries = attempts * (1 + int(settings.get("s5cmd_retry_count", 3)))
    return f"{cause} after {tries} attempts"


def with_cause(
    check: SeriesCheck, causes: Counter[str], settings: Mapping[str, Any]
) -> SeriesCheck:
    """The check of a failed series with its most frequent transport cause in front."""
    if check.ok or not causes:
        return check
    cause, attempts = causes.most_common(1)[0]
    reason = f"{cause_text(cause, attempts, settings)}; {check.reason}"
    return SeriesCheck(check.status, reason, check.files, check.bytes)


def fetch(
    rows: list[dict[str, Any]], shard_dir: Path, settings: Mapping[str, Any], progress: Progress
) -> dict[str, SeriesCheck]:
    """Download with s5cmd into .partial, verify, retry the failures with backoff."""
    binary = s5cmd.find_s5cmd()  # fail early and clearly
    provider = settings.get("provider", "aws")
    endpoint = s5cmd.resolve_endpoint(provider, settings.get("endpoint_url"))
    log_dir = shard_dir / S5CMD_DIR
    log_dir.mkdir(parents=True, exist_ok=True)
    for old in log_dir.glob("attempt-*.txt"):
        old.unlink()
    checks: dict[str, SeriesCheck] = {}
    causes: dict[str, Counter[str]] = {str(row["SeriesInstanceUID"]): Counter() for row in rows}
    landed = Landed(progress)
    overfull: set[str] = set()
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
        run = Attempt(pending, shard_dir, landed, progress)
        jobs = []
        for row in pending:
            uid = str(row["SeriesInstanceUID"])
            tidy_partial(row, shard_dir, landed)
            run.try_finish(uid)  # complete from an earlier run: nothing to fetch
            if uid not in run.checks:
                bucket = s5cmd.provider_bucket(provider, str(row["aws_bucket"]))
                dest = shard_dir / PARTIAL / uid
                jobs.append(s5cmd.CopyJob(bucket, str(row["crdc_series_uuid"]), dest))
        if jobs:
            manifest = log_dir / f"attempt-{attempt}.txt"
            manifest.write_text(s5cmd.build_manifest(jobs))
            log.info(
                "attempt %d: fetching %d series from %s with %s",
                attempt,
                len(jobs),
                endpoint,
                binary,
            )
            result = run.run(manifest, settings, endpoint)
            for uid, found in series_causes(result, pending).items():
                causes[uid].update(found)
        checks.update(run.checks)
        overfull |= run.late  # a retry would promote what it has and miss the extra objects
        for uid in run.late:
            causes[uid].clear()  # s5cmd's errors there came from moving the folder away
        pending = [
            row
            for row in pending
            if not checks[uid := str(row["SeriesInstanceUID"])].ok and uid not in overfull
        ]
    return {uid: with_cause(check, causes[uid], settings) for uid, check in checks.items()}


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
