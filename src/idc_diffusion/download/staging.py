"""A shard's series folders: staged in ``.partial``, verified, promoted into place with a
stamp of what was verified; verified folders kept by a rerun or linked from another shard."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from idc_diffusion.download import s5cmd
from idc_diffusion.download.expected import expected_count, listed_files
from idc_diffusion.download.report import write_json
from idc_diffusion.download.verify import (
    FileCheck,
    KnownFiles,
    SeriesCheck,
    series_files,
    verify_series,
)

# the stage's log lines keep the name of its entry module, as before this module was split off
log = logging.getLogger(__name__)

PARTIAL = ".partial"
ORIGIN = ".crdc_series_uuid"  # in a partial folder: the series version its files came from
VERIFIED = (
    ".verified"  # <uid>.json per verified series: file name -> [size, mtime_ns, content hash]
)


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


def demote(final: Path, partial: Path) -> None:
    """Move a promoted series' files back into its partial folder (more of its objects
    landed after it was promoted) and drop its stamp."""
    partial.mkdir(parents=True, exist_ok=True)
    for name in series_files(final):
        if not (partial / name).exists():
            os.replace(final / name, partial / name)
    shutil.rmtree(final)
    stamp_path(final).unlink(missing_ok=True)


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
