"""``download.source: local``: DICOM already on disk, indexed by SeriesInstanceUID.

The tree under ``local_root`` may have any layout. Every regular file is listed with its
size and mtime; only files that are new or changed since the cached index are opened, and
only their headers are read. The index is a parquet file shared by all shards (built under
a file lock, written atomically), so a tree of a million files is read once, not per shard.
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pydicom

log = logging.getLogger(__name__)

COLUMNS = ["path", "size", "mtime_ns", "SeriesInstanceUID", "SOPInstanceUID"]
SAFE_NAME = re.compile(r"^[0-9][0-9.]{0,63}$")


def scan_tree(root: Path) -> pd.DataFrame:
    """Every regular file under ``root`` (symlinks followed): path, size, mtime_ns."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(
            f"download.local_root {str(root)!r} is not a folder; point it at the DICOM tree"
        )
    records = []
    for folder, dirs, files in os.walk(root, followlinks=True):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                st = os.stat(path)
            except OSError:
                continue  # broken link or vanished file
            records.append((path, st.st_size, st.st_mtime_ns))
    return pd.DataFrame.from_records(records, columns=["path", "size", "mtime_ns"])


def read_uids(path: str) -> tuple[str | None, str | None]:
    """(SeriesInstanceUID, SOPInstanceUID) from the header only, or (None, None)."""
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"]
        )
    except Exception:  # not DICOM, or damaged: it simply is not in the index
        return None, None
    series, sop = ds.get("SeriesInstanceUID"), ds.get("SOPInstanceUID")
    return (str(series) if series else None), (str(sop) if sop else None)


def load_cache(cache: Path) -> pd.DataFrame:
    """The cached index, or an empty one when there is none or it cannot be read."""
    try:
        frame = pd.read_parquet(cache)
    except (OSError, ValueError, Exception) as exc:  # pyarrow raises its own types
        if cache.exists():
            log.warning("local index %s unreadable (%s); rebuilding", cache, exc)
        return pd.DataFrame(columns=COLUMNS)
    if list(frame.columns) != COLUMNS:
        log.warning("local index %s has other columns; rebuilding", cache)
        return pd.DataFrame(columns=COLUMNS)
    return frame


def update_index(files: pd.DataFrame, cached: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The index for ``files``: cached rows where path, size and mtime match, headers
    read for the rest. Returns (index, number of headers read)."""
    keys = ["path", "size", "mtime_ns"]
    merged = files.merge(cached[COLUMNS], on=keys, how="left", indicator=True)
    fresh = merged["_merge"] == "left_only"
    merged = merged.drop(columns="_merge")
    merged[["SeriesInstanceUID", "SOPInstanceUID"]] = merged[
        ["SeriesInstanceUID", "SOPInstanceUID"]
    ].astype(object)
    for i in merged.index[fresh]:
        merged.loc[i, ["SeriesInstanceUID", "SOPInstanceUID"]] = read_uids(merged.at[i, "path"])
    return merged[COLUMNS].reset_index(drop=True), int(fresh.sum())


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``path`` (created if needed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def local_index(root: Path, cache: Path) -> pd.DataFrame:
    """The up-to-date index of ``root``, using and refreshing the parquet ``cache``."""
    cache = Path(cache)
    with locked(cache.with_name(cache.name + ".lock")):
        files = scan_tree(Path(root).resolve())
        cached = load_cache(cache)
        index, read = update_index(files, cached)
        unchanged = read == 0 and len(index) == len(cached)
        if not unchanged:
            tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            index.to_parquet(tmp, index=False)
            os.replace(tmp, cache)
        log.info(
            "local index %s: %d files, %d series, %d headers read%s",
            cache,
            len(index),
            index["SeriesInstanceUID"].nunique(),
            read,
            "" if not unchanged else " (cache up to date)",
        )
    return index


def instance_name(sop_uid: str | None, source: str, taken: set[str]) -> str:
    """A file name for one instance in its series folder: ``<SOPInstanceUID>.dcm`` when that
    is a safe name, else the source's name (made unique)."""
    name = f"{sop_uid}.dcm" if sop_uid and SAFE_NAME.fullmatch(sop_uid) else Path(source).name
    stem, n = name, 1
    while name in taken or name.startswith("."):
        name, n = f"{n}-{stem.lstrip('.')}", n + 1
    taken.add(name)
    return name


def link_or_copy(source: str, dest: Path) -> None:
    """Hard-link ``source`` to ``dest``; copy when linking is impossible (other disk, ...)."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def link_series(index: pd.DataFrame, series_uid: str, dest: Path) -> int:
    """Put the files of one series into ``dest`` (one per SOPInstanceUID); returns the count."""
    rows = index[index["SeriesInstanceUID"] == series_uid].sort_values("path")
    rows = rows.drop_duplicates("SOPInstanceUID") if rows["SOPInstanceUID"].notna().all() else rows
    dest.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    for path, sop in zip(rows["path"], rows["SOPInstanceUID"], strict=True):
        link_or_copy(path, dest / instance_name(sop, path, taken))
    return len(rows)
