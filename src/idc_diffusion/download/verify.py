"""Per-series verification of downloaded (or synthesized) DICOM files.

A series is ``ok`` only when its folder holds exactly the expected number of distinct
instances (SOPInstanceUIDs, one file each), every file parses as DICOM Part-10, carries the
expected SeriesInstanceUID, has complete pixel data and no bytes past the end of its data
set. When the source lists each object's size and MD5 (BigQuery cohorts), every file must
match them too. Pixels are never decoded: the checks read headers and compare byte counts.

Files that :mod:`idc_diffusion.download.dicom_header` can vouch for are checked from their header
bytes alone; all others (and every file with a problem) go through pydicom, which words the
reasons.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from idc_diffusion.core.hashing import file_sha256, key_digest
from idc_diffusion.download.dicom_header import Header, read_header

log = logging.getLogger(__name__)

STATUSES = ("ok", "missing", "incomplete", "corrupt")
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
S5CMD_TEMPORARY = re.compile(r"\.dcm\d+$")  # s5cmd's CreateTemp(dir, name + "*")


@dataclass(frozen=True)
class SeriesCheck:
    """Outcome of verifying one series folder; an ``ok`` one carries each file's content hash."""

    status: str
    reason: str
    files: int
    bytes: int
    hashes: Mapping[str, str] = field(default_factory=dict, repr=False)  # name -> content

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def digest(self) -> str | None:
        """Content digest of an ``ok`` series (None otherwise): a SHA-256 over its sorted
        (file name, content hash) pairs, so it changes exactly when a file is renamed, added,
        removed or its bytes change (never on a bare ``touch``)."""
        if not self.ok:
            return None
        return key_digest(*(f"{n} {h}" for n, h in sorted(self.hashes.items()))).hex()


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of s5cmd's temporary files (``<object name><digits>``,
    renamed to the object name once complete, left behind when s5cmd is killed)."""
    return S5CMD_TEMPORARY.search(name) is not None


def series_files(folder: Path) -> dict[str, os.stat_result]:
    """name -> stat of the instance files of a series folder (regular files, neither hidden
    nor temporary), sorted by name; empty when the folder does not exist. One scandir, one
    stat a file."""
    try:
        with os.scandir(folder) as scan:
            entries = [
                e
                for e in scan
                if not e.name.startswith(".") and not is_temporary(e.name) and e.is_file()
            ]
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


def pixel_element(ds: Dataset) -> str | None:
    """Keyword of the pixel data element of ``ds``, or None."""
    return next((k for k in PIXEL_KEYWORDS if k in ds), None)


def pixel_problem(ds: Dataset) -> str | None:
    """Why the pixel data of ``ds`` is incomplete or cannot be checked, or None when it
    looks whole."""
    keyword = pixel_element(ds)
    if keyword is None:
        return "no pixel data (truncated?)"
    value = ds[keyword].value
    if value is None or len(value) == 0:
        return f"empty {keyword}"
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and not syntax.is_transfer_syntax:
        return (
            f"TransferSyntaxUID {syntax} is not a transfer syntax pydicom knows (private or "
            "newer); its pixel data cannot be checked or decoded"
        )
    if keyword == "PixelData" and syntax is not None and syntax.is_encapsulated:
        return None  # compressed: dcmread already failed or dropped a truncated element
    expected = expected_pixel_bytes(ds)
    if keyword == "PixelData" and expected is not None and len(value) < expected:
        return f"PixelData has {len(value)} bytes, expected {expected} (truncated)"
    return None


def size_problem(ds: Dataset, size: int) -> str | None:
    """Why a file of ``size`` bytes holds more than the data set pydicom read from it (bytes
    past its last element, or garbage read as elements out of tag order), or None."""
    tags = list(ds.keys())  # in file order
    if tags != sorted(tags):
        return "bytes after the end of its data set that are not DICOM elements"
    last = ds[tags[-1]]
    value = last.value
    if last.file_tell is None or not isinstance(value, bytes):
        return None  # pydicom does not say where it ends
    end = last.file_tell + len(value) + (8 if last.is_undefined_length else 0)
    if size > end:
        return f"{size - end} bytes after the end of its data set ({size} bytes, header says {end})"
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


def fast_check(path: str | Path, series_uid: str) -> Header | None:
    """The header of a file that is fine judging by its header bytes alone (the fast path
    reads the whole structure to the end of the file), or None: ask pydicom."""
    try:
        header = read_header(path)
    except OSError:
        return None
    return header if header is not None and header_fine(header, series_uid) else None


class FileCheck(NamedTuple):
    """Outcome of checking one instance file: its SOPInstanceUID, its problem (prefixed by
    the file name) or None when it is fine, and the hash of its bytes when it is fine
    (``md5:<hex>`` as the source lists it, else ``sha256:<hex>``)."""

    sop_uid: str | None
    problem: str | None
    content: str | None = None


def pydicom_check(path: str | Path, series_uid: str) -> FileCheck:
    """:func:`check_file` by reading the whole file with pydicom. Never raises: whatever
    pydicom raises on a damaged or unusual file becomes the problem."""
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        sop = ds.get("SOPInstanceUID")
        sop = None if sop is None else str(sop)
        problem = pixel_problem(ds) or size_problem(ds, path.stat().st_size)
        found = ds.get("SeriesInstanceUID")
    except InvalidDicomError as exc:
        return FileCheck(None, f"{path.name}: not a DICOM file ({exc})")
    except Exception as exc:  # pydicom raises many types on damaged files
        return FileCheck(None, f"{path.name}: unreadable ({type(exc).__name__}: {exc})")
    if problem:
        return FileCheck(sop, f"{path.name}: {problem}")
    if found != series_uid:
        return FileCheck(sop, f"{path.name}: SeriesInstanceUID {found} != expected {series_uid}")
    return FileCheck(sop, None)


# name -> (instance_size, instance_hash: MD5 hex) of each object the source lists
ListedFiles = Mapping[str, tuple[int, str]]


def file_md5(path: str | Path) -> str:
    """MD5 of a file's bytes (hex): the hash IDC lists as each instance's ``instance_hash``."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "md5").hexdigest()


def content_problem(path: str | Path, size: int, md5: str) -> str | None:
    """Why the file's bytes differ from the source's size and MD5, or None."""
    try:
        actual = os.stat(path).st_size
        if actual != size:
            return f"{actual} bytes, the source lists {size} (instance_size)"
        digest = file_md5(path)
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if digest != md5.lower():
        return f"MD5 {digest} differs from the source's instance_hash {md5}"
    return None


def check_file(
    path: str | Path, series_uid: str, listed: tuple[int, str] | None = None
) -> FileCheck:
    """Check one instance file (against its source size and MD5 when ``listed``); a fine
    file's check carries its content hash: the listed MD5, already compared, or a SHA-256
    read now while the file is in the page cache (SHA-256: over twice MD5's speed on CPUs
    with SHA extensions)."""
    name = os.path.basename(path)
    if listed is not None and (problem := content_problem(path, *listed)):
        return FileCheck(None, f"{name}: {problem}")
    header = fast_check(path, series_uid)
    check = (
        FileCheck(header.sop_uid, None) if header is not None else pydicom_check(path, series_uid)
    )
    if check.problem is not None:
        return check
    try:
        content = f"md5:{listed[1].lower()}" if listed else f"sha256:{file_sha256(path)}"
        return check._replace(content=content)
    except OSError as exc:
        return FileCheck(check.sop_uid, f"{name}: unreadable ({exc.strerror or exc})")


# name -> (size, check) of files checked earlier (e.g. during download)
KnownFiles = Mapping[str, tuple[int, FileCheck]]


def duplicates(checks: Mapping[str, FileCheck]) -> dict[str, list[str]]:
    """SOPInstanceUID -> file names, for instances held by more than one file."""
    names: dict[str, list[str]] = {}
    for name, check in checks.items():
        if check.sop_uid is not None:
            names.setdefault(check.sop_uid, []).append(name)
    return {sop: found for sop, found in names.items() if len(found) > 1}


def count_problem(
    names: list[str], distinct: int, expected: int, listed: ListedFiles | None
) -> str | None:
    """Why the files are not the series' instances (missing or extra), or None."""
    if listed is not None:
        missing = sorted(set(listed) - set(names))
        if missing:
            shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
            return f"{len(missing)} of {len(listed)} files missing ({shown})"
    if distinct < expected:
        return f"{expected - distinct} of {expected} files missing"
    if distinct > expected:
        return f"{distinct} files, expected {expected}"
    return None


def verify_series(
    folder: Path,
    series_uid: str,
    expected_instances: int,
    known: KnownFiles | None = None,
    listed: ListedFiles | None = None,
) -> SeriesCheck:
    """Check the files of one series in ``folder``: each file whole (and as the source lists
    it, when ``listed``), one file per SOPInstanceUID, as many instances as the index says.

    A file listed in ``known`` with its current size is not read again.
    """
    files = {name: st.st_size for name, st in series_files(Path(folder)).items()}
    size = sum(files.values())
    if not files:
        return SeriesCheck("missing", f"no files (expected {expected_instances})", 0, 0)
    known = known or {}
    checks = {
        name: known[name][1]
        if name in known and known[name][0] == n
        else check_file(Path(folder) / name, series_uid, listed.get(name) if listed else None)
        for name, n in files.items()
    }
    problems = [c.problem for c in checks.values() if c.problem is not None]
    if listed is not None:
        problems += [
            f"{name}: not an object of this series in the source"
            for name in files
            if name not in listed
        ]
    if problems:
        more = f" (+{len(problems) - 1} more bad files)" if len(problems) > 1 else ""
        return SeriesCheck("corrupt", problems[0] + more, len(files), size)
    repeated = duplicates(checks)
    distinct = len(files) - sum(len(names) - 1 for names in repeated.values())
    if repeated:
        sop, names = next(iter(repeated.items()))
        reason = (
            f"SOPInstanceUID {sop} is in both {' and '.join(names)}: {len(files)} files hold "
            f"{distinct} distinct instances, expected {expected_instances}"
        )
        return SeriesCheck("corrupt", reason, len(files), size)
    reason = count_problem(list(files), distinct, expected_instances, listed)
    if reason:
        return SeriesCheck("incomplete", reason, len(files), size)
    hashes = {name: str(check.content) for name, check in checks.items()}
    return SeriesCheck("ok", "", len(files), size, hashes)
