"""Read one DICOM series folder into a sorted float32 stack (HU for CT).

Two steps, so large series are never fully decoded: :func:`scan_series` reads headers only
(pixel data deferred), rejects unusable files and sorts the rest; :func:`load_slices` decodes
the slices asked for and applies the modality LUT. :func:`read_series` does both for every
slice.

Sorting: slices with ImageOrientationPatient and ImagePositionPatient are ordered by their
position along the slice normal (row cosines x column cosines), never by file name. Series
without positions (projection radiographs) keep InstanceNumber order, then file name.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from idc_diffusion.windowing import apply_modality_lut, first_value

PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
OBLIQUE_COSINE = 0.8  # |normal component| below this on every axis -> "oblique"


@dataclass(frozen=True)
class Rejection:
    """A file that was not used, and why (the reason names the file)."""

    file: str
    reason: str


@dataclass(frozen=True)
class SliceHeader:
    """What is needed from one file's header to sort it and to caption its image."""

    path: Path
    rows: int
    cols: int
    sop_uid: str
    instance_number: float
    orientation: tuple[float, ...] | None
    position: tuple[float, ...] | None
    slope: float
    intercept: float
    photometric: str
    window_center: float | None
    window_width: float | None


@dataclass
class SeriesScan:
    """A series' usable slices in anatomical order, plus its rejected files."""

    folder: Path
    slices: list[SliceHeader]
    positions_mm: np.ndarray  # [n] position along the normal; NaN without geometry
    plane: str | None  # axial / coronal / sagittal / oblique; None without orientation
    header: dict[str, str | None]  # Modality, BodyPartExamined, PatientSex, PatientAge, ...
    rejected: list[Rejection] = field(default_factory=list)


@dataclass
class SeriesVolume:
    """Decoded slices of a series (modality LUT applied), in sorted order."""

    volume: np.ndarray  # float32 [n, rows, cols]
    slice_indices: list[int]  # index of each slice in the sorted stack
    positions_mm: np.ndarray  # [n]
    sop_uids: list[str]
    files: list[str]
    photometric: str
    window_center: float | None
    window_width: float | None
    plane: str | None
    header: dict[str, str | None]
    rejected: list[Rejection] = field(default_factory=list)


class SliceError(Exception):
    """A file cannot be used; the message is the reason."""


HEADER_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "PatientSex",
    "PatientAge",
    "ViewPosition",
    "SeriesInstanceUID",
)


def read_header(path: Path) -> tuple[SliceHeader, dict[str, str | None]]:
    """Parse one file's header (pixel data deferred); SliceError if it cannot be used."""
    try:
        ds = pydicom.dcmread(path, defer_size="4 KB")
    except Exception as exc:  # pydicom raises many types for broken files
        raise SliceError(f"{path.name}: unreadable DICOM ({type(exc).__name__}: {exc})") from exc
    _check_pixel_data(ds, path)
    header = SliceHeader(
        path=path,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=_number(ds.get("InstanceNumber"), np.inf),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),
        slope=_number(ds.get("RescaleSlope"), 1.0),
        intercept=_number(ds.get("RescaleIntercept"), 0.0),
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
        window_center=first_value(ds.get("WindowCenter")),
        window_width=first_value(ds.get("WindowWidth")),
    )
    fields = {k: (str(ds.get(k)).strip() or None) if ds.get(k) else None for k in HEADER_KEYWORDS}
    return header, fields


def _check_pixel_data(ds: Dataset, path: Path) -> None:
    """SliceError for missing, truncated, multi-frame or colour pixel data."""
    elem = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if elem is None:
        raise SliceError(f"{path.name}: no PixelData")
    if "Rows" not in ds or "Columns" not in ds:
        raise SliceError(f"{path.name}: no Rows/Columns")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SliceError(f"{path.name}: colour images (SamplesPerPixel > 1) are not supported")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SliceError(f"{path.name}: multi-frame images are not supported")
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    if length is None or tell is None or length == UNDEFINED_LENGTH:
        return
    size = os.path.getsize(path)
    if tell + length > size:
        raise SliceError(
            f"{path.name}: truncated file ({size} bytes, PixelData needs {tell + length})"
        )
    expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("BitsAllocated", 16)) // 8
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated and length < expected:
        raise SliceError(f"{path.name}: PixelData has {length} bytes, expected {expected}")


def _number(value: object, default: float) -> float:
    number = first_value(value)
    return default if number is None else number


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """n finite floats from a multi-valued element, else None."""
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and np.all(np.isfinite(numbers)) else None


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of an image plane: row cosines x column cosines."""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = np.linalg.norm(normal)
    if norm == 0:
        raise ValueError(f"degenerate ImageOrientationPatient {orientation}")
    return normal / norm


def plane_name(orientation: Sequence[float] | None) -> str | None:
    """axial / coronal / sagittal from the dominant normal axis (LPS), else oblique."""
    if orientation is None:
        return None
    normal = np.abs(slice_normal(orientation))
    axis = int(np.argmax(normal))
    if normal[axis] < OBLIQUE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def _majority(values: list, key) -> object:
    """Most common key among values (ties: first seen, i.e. by file name)."""
    return Counter(key(v) for v in values).most_common(1)[0][0]


def _reject_minority(
    headers: list[SliceHeader], key, what: str
) -> tuple[list[SliceHeader], list[Rejection]]:
    """Keep headers whose key equals the majority; reject the others naming `what`."""
    if not headers:
        return headers, []
    majority = _majority(headers, key)
    kept = [h for h in headers if key(h) == majority]
    rejected = [
        Rejection(
            h.path.name, f"{h.path.name}: {what} {key(h)} differs from the majority {majority}"
        )
        for h in headers
        if key(h) != majority
    ]
    return kept, rejected


def sort_slices(headers: list[SliceHeader]) -> tuple[list[SliceHeader], np.ndarray]:
    """Order slices along the normal if all have geometry, else by InstanceNumber.

    Returns the sorted headers and their positions along the normal (NaN without geometry).
    """
    if headers and all(h.orientation and h.position for h in headers):
        normal = slice_normal(headers[0].orientation)  # type: ignore[arg-type]
        pos = np.array([float(np.dot(normal, h.position)) for h in headers])  # type: ignore[arg-type]
        order = sorted(range(len(headers)), key=lambda i: (pos[i], headers[i].instance_number))
        return [headers[i] for i in order], pos[order]
    order = sorted(
        range(len(headers)), key=lambda i: (headers[i].instance_number, headers[i].path.name)
    )
    return [headers[i] for i in order], np.full(len(headers), np.nan)


def list_files(folder: Path) -> list[Path]:
    """Regular, non-hidden files under a series folder, by name (names carry no order)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))


def scan_series(folder: Path) -> SeriesScan:
    """Read headers of every file in `folder`, reject unusable ones and sort the rest."""
    headers: list[SliceHeader] = []
    fields: list[dict[str, str | None]] = []
    rejected: list[Rejection] = []
    for path in list_files(folder):
        try:
            header, header_fields = read_header(path)
        except SliceError as exc:
            rejected.append(Rejection(path.name, str(exc)))
            continue
        headers.append(header)
        fields.append(header_fields)
    headers, wrong_size = _reject_minority(headers, lambda h: (h.rows, h.cols), "matrix size")
    geometric = [h for h in headers if h.orientation is not None]
    wrong_orientation: list[Rejection] = []
    if geometric and len(geometric) == len(headers):
        headers, wrong_orientation = _reject_minority(
            headers, lambda h: tuple(np.round(h.orientation, 3)), "orientation"
        )
    ordered, positions = sort_slices(headers)
    plane = plane_name(ordered[0].orientation) if ordered else None
    return SeriesScan(
        folder=folder,
        slices=ordered,
        positions_mm=positions,
        plane=plane,
        header=_merge_fields(fields),
        rejected=rejected + wrong_size + wrong_orientation,
    )


def _merge_fields(fields: list[dict[str, str | None]]) -> dict[str, str | None]:
    """First non-empty value of each header keyword across the series' files."""
    merged: dict[str, str | None] = dict.fromkeys(HEADER_KEYWORDS)
    for keyword in HEADER_KEYWORDS:
        merged[keyword] = next((f[keyword] for f in fields if f.get(keyword)), None)
    return merged


def decode_slice(header: SliceHeader) -> np.ndarray:
    """Decode one file's pixels and apply its modality LUT (float32 [rows, cols])."""
    try:
        ds = pydicom.dcmread(header.path)
        stored = ds.pixel_array
    except Exception as exc:  # decoders raise many types
        name = header.path.name
        raise SliceError(f"{name}: undecodable pixel data ({type(exc).__name__}: {exc})") from exc
    if stored.shape != (header.rows, header.cols):
        raise SliceError(f"{header.path.name}: decoded shape {stored.shape} is not 2-D Rows x Cols")
    return apply_modality_lut(stored, header.slope, header.intercept)


def load_slices(scan: SeriesScan, indices: Sequence[int] | None = None) -> SeriesVolume:
    """Decode the sorted slices at `indices` (all by default); failures go to `rejected`."""
    wanted = range(len(scan.slices)) if indices is None else indices
    arrays, kept, rejected = [], [], list(scan.rejected)
    for index in wanted:
        try:
            arrays.append(decode_slice(scan.slices[index]))
            kept.append(index)
        except SliceError as exc:
            rejected.append(Rejection(scan.slices[index].path.name, str(exc)))
    first = scan.slices[kept[0]] if kept else None
    shape = (0, first.rows, first.cols) if first else (0, 0, 0)
    return SeriesVolume(
        volume=np.stack(arrays).astype(np.float32) if arrays else np.zeros(shape, np.float32),
        slice_indices=kept,
        positions_mm=scan.positions_mm[kept] if kept else np.zeros(0),
        sop_uids=[scan.slices[i].sop_uid for i in kept],
        files=[scan.slices[i].path.name for i in kept],
        photometric=first.photometric if first else "MONOCHROME2",
        window_center=first.window_center if first else None,
        window_width=first.window_width if first else None,
        plane=scan.plane,
        header=scan.header,
        rejected=rejected,
    )


def read_series(folder: Path) -> SeriesVolume:
    """Scan, sort and decode every usable slice of a series folder."""
    return load_slices(scan_series(folder))
