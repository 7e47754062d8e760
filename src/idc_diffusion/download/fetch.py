"""Fetching with s5cmd: attempts with backoff, files checked as they land, series promoted
as soon as they are complete, transport causes (errors, stalls) carried into the reasons."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from idc_diffusion.core.progress import Progress
from idc_diffusion.download import s5cmd
from idc_diffusion.download.expected import expected_count, listed_files
from idc_diffusion.download.staging import ORIGIN, PARTIAL, demote, finish
from idc_diffusion.download.verify import (
    FileCheck,
    ListedFiles,
    SeriesCheck,
    check_file,
    is_temporary,
    series_files,
    verify_series,
)

# the stage's log lines keep the name of its entry module, as before this module was split off
log = logging.getLogger(__name__)

S5CMD_DIR = ".s5cmd"
CHECK_BATCH = 32  # landed files per verification task: waking the thread per file costs more
DEFAULT_STALL_S = 300.0


@dataclass
class Landed:
    """The checks of the files in the partial folders of the series being fetched, and the
    bytes they count in progress (a file re-fetched replaces its count, never adds to it)."""

    progress: Progress
    known: dict[str, dict[str, tuple[int, FileCheck]]] = field(default_factory=dict)

    def record(self, uid: str, name: str, size: int, check: FileCheck) -> None:
        """Keep the check of a landed file; count its size (once per file) in progress."""
        old = self.known.setdefault(uid, {}).get(name)
        self.known[uid][name] = (size, check)
        self.progress.add_bytes(size - (old[0] if old else 0))

    def forget(self, uid: str, name: str) -> None:
        """Drop a file that is gone or removed, and its bytes from progress."""
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
