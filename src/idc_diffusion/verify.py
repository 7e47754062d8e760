"""Per-series verification of downloaded (or synthesized) DICOM files.

A series is ``ok`` only when its folder holds exactly the expected number of files, every
file parses as DICOM Part-10, carries the expected SeriesInstanceUID and has complete pixel
data. Pixels are never decoded: the checks read headers and compare byte counts.

Files that :mod:`idc_diffusion.dicom_header` can vouch for are checked from their header
bytes alone; all others (and every file with a problem) go through pydicom, which words the
reasons.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from idc_diffusion.dicom_header import Header, read_header

log = logging.getLogger(__name__)

STATUSES = ("ok", "missing", "incomplete", "corrupt")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


@dataclass(frozen=True)
class SeriesCheck:
    """Outcome of verifying one series folder."""

    status: str
    reason: str
    files: int
    bytes: int

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def series_files(folder: Path) -> dict[str, os.stat_result]:
    """name -> stat of the instance files of a series folder (regular, non-hidden files),
    sorted by name; empty when the folder does not exist. One scandir, one stat a file."""
    try:
        with os.scandir(folder) as scan:
            entries = [e for e in scan if not e.name.startswith(".") and e.is_file()]
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {e.name: e.stat() for e in sorted(entries, key=lambda e: e.name)}


def native_pixel_bytes(rows: int, cols: int, samples: int, frames: int, bits: int) -> int:
    """Bytes of native PixelData for the given image size (whole bytes)."""
    return (rows * cols * samples * frames * bits + 7) // 8


def expected_pixel_bytes(ds: Dataset) -> int | None:
    """Length of native (uncompressed) PixelData implied by the image header, else None."""
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        bits = int(ds.BitsAllocated)
        samples = int(ds.get("SamplesPerPixel", 1))
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    return native_pixel_bytes(rows, cols, samples, frames, bits)


def pixel_problem(ds: Dataset) -> str | None:
    """Why the pixel data of ``ds`` is incomplete, or None when it looks whole."""
    keyword = next((k for k in PIXEL_KEYWORDS if k in ds), None)
    if keyword is None:
        return "no pixel data (truncated?)"
    value = ds[keyword].value
    if value is None or len(value) == 0:
        return f"empty {keyword}"
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if keyword == "PixelData" and syntax is not None and syntax.is_encapsulated:
        return None  # compressed: dcmread already failed or dropped a truncated element
    expected = expected_pixel_bytes(ds)
    if keyword == "PixelData" and expected is not None and len(value) < expected:
        return f"PixelData has {len(value)} bytes, expected {expected} (truncated)"
    return None


def header_fine(header: Header, series_uid: str) -> bool:
    """Whether a fast-path header passes the checks of :func:`check_file` (False also when
    it lacks a field those checks use, so pydicom decides)."""
    rows, cols, bits = header.rows, header.columns, header.bits_allocated
    if header.series_uid != series_uid or rows is None or cols is None or bits is None:
        return False
    samples = 1 if header.samples_per_pixel is None else header.samples_per_pixel
    expected = native_pixel_bytes(rows, cols, samples, header.number_of_frames or 1, bits)
    return header.pixel_length > 0 and header.pixel_length >= expected


def fast_fine(path: str | Path, series_uid: str) -> bool:
    """Whether the file is fine judging by its header bytes alone (False: ask pydicom)."""
    try:
        header = read_header(path)
    except OSError:
        return False
    return header is not None and header_fine(header, series_uid)


def pydicom_check(path: str | Path, series_uid: str) -> str | None:
    """:func:`check_file` by reading the whole file with pydicom."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except InvalidDicomError as exc:
        return f"{path.name}: not a DICOM file ({exc})"
    except Exception as exc:  # pydicom raises many types on damaged files
        return f"{path.name}: unreadable ({type(exc).__name__}: {exc})"
    problem = pixel_problem(ds)
    if problem:
        return f"{path.name}: {problem}"
    found = ds.get("SeriesInstanceUID")
    if found != series_uid:
        return f"{path.name}: SeriesInstanceUID {found} != expected {series_uid}"
    return None


def check_file(path: str | Path, series_uid: str) -> str | None:
    """Problem with one instance file (prefixed by its name), or None when it is fine."""
    return None if fast_fine(path, series_uid) else pydicom_check(path, series_uid)


# name -> (size, problem or None): results of check_file made earlier (e.g. during download)
KnownFiles = Mapping[str, tuple[int, str | None]]


def verify_series(
    folder: Path, series_uid: str, expected_instances: int, known: KnownFiles | None = None
) -> SeriesCheck:
    """Check the files of one series in ``folder`` against the index's instance count.

    A file listed in ``known`` with its current size is not read again.
    """
    files = {name: st.st_size for name, st in series_files(Path(folder)).items()}
    size = sum(files.values())
    if not files:
        return SeriesCheck("missing", f"no files (expected {expected_instances})", 0, 0)
    known = known or {}
    results = [
        known[name][1]
        if name in known and known[name][0] == n
        else check_file(Path(folder) / name, series_uid)
        for name, n in files.items()
    ]
    problems = [p for p in results if p is not None]
    if problems:
        more = f" (+{len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        return SeriesCheck("corrupt", problems[0] + more, len(files), size)
    if len(files) < expected_instances:
        reason = f"{expected_instances - len(files)} of {expected_instances} files missing"
        return SeriesCheck("incomplete", reason, len(files), size)
    if len(files) > expected_instances:
        reason = f"{len(files)} files, expected {expected_instances}"
        return SeriesCheck("incomplete", reason, len(files), size)
    return SeriesCheck("ok", "", len(files), size)
