"""Read one DICOM series folder into a sorted float32 stack (HU for CT).

Two steps, so large series are never fully decoded: :func:`scan_series` reads headers only
(pixel data deferred), rejects unusable files and frames and sorts the rest; :func:`load_slices`
decodes the slices asked for (one frame at a time) and applies the modality LUT.
:func:`read_series` does both for every slice.

A "slice" is one frame: a single-frame file, or one frame of an enhanced multi-frame file
whose position, orientation, rescale, window and pixel spacing come from its Per-Frame
Functional Groups (falling back to the Shared Functional Groups, then the top level).

Sorting: slices with ImageOrientationPatient and ImagePositionPatient are ordered by their
position along the slice normal (row cosines x column cosines), never by file name. Series
without positions (projection radiographs) keep InstanceNumber order, then file name.
Localizers (ImageType/FrameType LOCALIZER), frames whose matrix size or orientation differs
from the series' majority, colour or palette images, missing/truncated pixel data and zero or
missing rescale slopes are rejected with the reason.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from idc_diffusion.geometry import is_localizer, plane_name, slice_normal
from idc_diffusion.windowing import (
    Lut,
    apply_lut,
    apply_modality_lut,
    first_value,
    lut_from_item,
    voi_windows,
)

__all__ = ["plane_name", "slice_normal"]  # re-exported: geometry lives in geometry.py

PIXEL_DATA_TAG = 0x7FE00010
UNDEFINED_LENGTH = 0xFFFFFFFF
GREYSCALE = frozenset({"MONOCHROME1", "MONOCHROME2"})


@dataclass(frozen=True)
class Rejection:
    """A file (or frame) that was not used, why (the reason names it), and a category."""

    file: str
    reason: str
    category: str = "unusable"


@dataclass(frozen=True, eq=False)
class SliceHeader:
    """What is needed from one frame's header to sort, decode and caption it."""

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
    frame: int | None = None  # 0-based frame of a multi-frame file; None: single frame
    pixel_spacing: tuple[float, ...] | None = None  # (row spacing, column spacing) in mm
    windows: tuple[tuple[float, float], ...] = ()  # every WindowCenter/Width pair
    voi_luts: tuple[Lut, ...] = ()  # VOI LUT Sequence items
    modality_lut: Lut | None = None  # Modality LUT Sequence (replaces slope/intercept)

    @property
    def name(self) -> str:
        """The file name, with the 1-based frame number for multi-frame files."""
        return self.path.name if self.frame is None else f"{self.path.name}:frame{self.frame + 1}"


@dataclass
class SeriesScan:
    """A series' usable slices in anatomical order, plus its rejected files."""

    folder: Path
    slices: list[SliceHeader]
    positions_mm: np.ndarray  # [n] position along the normal; NaN without geometry
    plane: str | None  # axial / coronal / sagittal / oblique; None without orientation
    header: dict[str, str | None]  # Modality, BodyPartExamined, PatientSex, PatientAge, ...
    rejected: list[Rejection] = field(default_factory=list)

    @property
    def z_mm(self) -> np.ndarray:
        """Each sorted slice's patient z (superior) coordinate; NaN without geometry."""
        return np.array([s.position[2] if s.position else np.nan for s in self.slices])


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
    """A file cannot be used; the message is the reason, `category` its kind."""

    def __init__(self, message: str, category: str = "unusable") -> None:
        super().__init__(message)
        self.category = category


HEADER_KEYWORDS = (
    "Modality",
    "BodyPartExamined",
    "PatientSex",
    "PatientAge",
    "ViewPosition",
    "SeriesInstanceUID",
    "ContrastBolusAgent",
)


def read_frames(
    path: Path,
) -> tuple[list[SliceHeader], dict[str, str | None], list[Rejection]]:
    """Parse one file's header (pixel data deferred) into one SliceHeader per usable frame.

    Returns the headers, the file's caption-relevant fields and the rejected frames (e.g.
    localizer frames of an enhanced object); SliceError if the file cannot be used at all.
    """
    try:
        ds = pydicom.dcmread(path, defer_size="4 KB")
    except Exception as exc:  # pydicom raises many types for broken files
        raise SliceError(
            f"{path.name}: unreadable DICOM ({type(exc).__name__}: {exc})", "unreadable"
        ) from exc
    headers, rejected = [], []
    try:
        frames = _check_pixel_data(ds, path)
        for frame in range(frames):
            try:
                headers.append(_frame_header(ds, path, frame if frames > 1 else None))
            except SliceError as exc:
                if frames == 1:
                    raise
                rejected.append(Rejection(f"{path.name}:frame{frame + 1}", str(exc), exc.category))
        fields = _header_fields(ds)
    except SliceError:
        raise
    except Exception as exc:  # malformed values (e.g. a non-numeric IS)
        raise SliceError(
            f"{path.name}: invalid header ({type(exc).__name__}: {exc})", "invalid_header"
        ) from exc
    return headers, fields, rejected


def read_header(path: Path) -> tuple[SliceHeader, dict[str, str | None]]:
    """The header of a single-frame file (SliceError for multi-frame files: use read_frames)."""
    headers, fields, _ = read_frames(path)
    if len(headers) != 1:
        raise SliceError(f"{path.name}: {len(headers)} frames; use read_frames", "multi_frame")
    return headers[0], fields


def _header_fields(ds: Dataset) -> dict[str, str | None]:
    fields = {k: (str(ds.get(k)).strip() or None) if ds.get(k) else None for k in HEADER_KEYWORDS}
    if not fields["ContrastBolusAgent"] and ds.get("ContrastBolusAgentSequence"):
        fields["ContrastBolusAgent"] = "yes"  # enhanced objects code the agent in a sequence
    return fields


def _functional(ds: Dataset, frame: int | None, sequence: str) -> Dataset | None:
    """Item 0 of a functional group macro for a frame: per-frame, else shared, else None."""
    groups = []
    if frame is not None and "PerFrameFunctionalGroupsSequence" in ds:
        per_frame = ds.PerFrameFunctionalGroupsSequence
        if frame < len(per_frame):
            groups.append(per_frame[frame])
    if "SharedFunctionalGroupsSequence" in ds and len(ds.SharedFunctionalGroupsSequence):
        groups.append(ds.SharedFunctionalGroupsSequence[0])
    for group in groups:
        items = group.get(sequence)
        if items:
            return items[0]
    return None


def _frame_value(ds: Dataset, frame: int | None, sequence: str, keyword: str) -> Any:
    """A keyword from a frame's functional group `sequence`, else from the top level."""
    item = _functional(ds, frame, sequence)
    if item is not None and keyword in item:
        return item.get(keyword)
    return ds.get(keyword)


def _rescale(ds: Dataset, frame: int | None, path: Path) -> tuple[float, float, Lut | None]:
    """Slope, intercept and Modality LUT of a frame (SliceError when they are unusable)."""
    group = "PixelValueTransformationSequence"
    slope_value = _frame_value(ds, frame, group, "RescaleSlope")
    intercept_value = _frame_value(ds, frame, group, "RescaleIntercept")
    lut_items = ds.get("ModalityLUTSequence")
    if lut_items:
        try:
            return 1.0, 0.0, lut_from_item(lut_items[0], int(ds.get("PixelRepresentation", 0)) == 1)
        except (ValueError, TypeError, AttributeError) as exc:
            raise SliceError(
                f"{path.name}: unusable ModalityLUTSequence ({exc})", "rescale"
            ) from exc
    slope, intercept = first_value(slope_value), first_value(intercept_value)
    if slope_value is not None and slope is None:
        raise SliceError(f"{path.name}: RescaleSlope {slope_value!r} is not a number", "rescale")
    if slope == 0:
        raise SliceError(f"{path.name}: RescaleSlope is 0 (all pixels would be equal)", "rescale")
    if slope is None and intercept is not None:
        raise SliceError(f"{path.name}: RescaleIntercept without RescaleSlope", "rescale")
    if slope is None and str(ds.get("Modality", "")).upper() == "CT":
        raise SliceError(
            f"{path.name}: CT image without RescaleSlope/RescaleIntercept (HU unknown)", "rescale"
        )
    return (1.0 if slope is None else slope), (intercept or 0.0), None


def _frame_header(ds: Dataset, path: Path, frame: int | None) -> SliceHeader:
    """The SliceHeader of one frame (frame None: a single-frame file)."""
    image_type = _frame_value(ds, frame, "CTImageFrameTypeSequence", "FrameType") or _frame_value(
        ds, frame, "MRImageFrameTypeSequence", "FrameType"
    )
    if is_localizer(ds.get("ImageType")) or is_localizer(image_type):
        where = path.name if frame is None else f"{path.name}:frame{frame + 1}"
        raise SliceError(f"{where}: localizer/scout image (ImageType LOCALIZER)", "localizer")
    slope, intercept, modality_lut = _rescale(ds, frame, path)
    windows = voi_windows(
        _frame_value(ds, frame, "FrameVOILUTSequence", "WindowCenter"),
        _frame_value(ds, frame, "FrameVOILUTSequence", "WindowWidth"),
    )
    voi_luts = []
    for item in ds.get("VOILUTSequence") or []:
        try:
            voi_luts.append(lut_from_item(item))
        except (ValueError, TypeError, AttributeError):
            continue  # a broken VOI LUT is skipped; windows or percentiles remain
    return SliceHeader(
        path=path,
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        instance_number=_number(ds.get("InstanceNumber"), np.inf),
        orientation=_floats(
            _frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), 6
        ),
        position=_floats(
            _frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), 3
        ),
        slope=slope,
        intercept=intercept,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
        window_center=windows[0][0] if windows else None,
        window_width=windows[0][1] if windows else None,
        frame=frame,
        pixel_spacing=_floats(_frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing"), 2),
        windows=tuple(windows),
        voi_luts=tuple(voi_luts),
        modality_lut=modality_lut,
    )


def _check_pixel_data(ds: Dataset, path: Path) -> int:
    """The number of frames; SliceError for missing, truncated or non-greyscale pixel data."""
    elem = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if elem is None:
        raise SliceError(f"{path.name}: no PixelData", "no_pixel_data")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise SliceError(f"{path.name}: no {keyword}", "invalid_header")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if int(ds.get("SamplesPerPixel", 1)) != 1 or photometric not in GREYSCALE:
        raise SliceError(
            f"{path.name}: unsupported PhotometricInterpretation {photometric} "
            "(only greyscale MONOCHROME1/MONOCHROME2 images are used)",
            "photometric",
        )
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise SliceError(f"{path.name}: no TransferSyntaxUID in the file meta", "invalid_header")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SliceError(f"{path.name}: invalid NumberOfFrames ({exc})", "invalid_header") from exc
    if frames < 1:
        raise SliceError(f"{path.name}: NumberOfFrames {frames}", "invalid_header")
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    deflated = ds.file_meta.TransferSyntaxUID.is_deflated  # offsets are in inflated bytes
    if length is None or tell is None or length == UNDEFINED_LENGTH or deflated:
        return frames
    size = os.path.getsize(path)
    if tell + length > size:
        raise SliceError(
            f"{path.name}: truncated file ({size} bytes, PixelData needs {tell + length})",
            "truncated",
        )
    bits = int(ds.BitsAllocated)
    expected = (int(ds.Rows) * int(ds.Columns) * frames * bits + 7) // 8
    if not ds.file_meta.TransferSyntaxUID.is_encapsulated and length < expected:
        raise SliceError(
            f"{path.name}: PixelData has {length} bytes, expected {expected}", "truncated"
        )
    return frames


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
            h.name,
            f"{h.name}: {what} {key(h)} differs from the majority {majority}",
            what.replace(" ", "_"),
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
        order = sorted(
            range(len(headers)),
            key=lambda i: (pos[i], headers[i].instance_number, headers[i].frame or 0),
        )
        return [headers[i] for i in order], pos[order]
    order = sorted(
        range(len(headers)),
        key=lambda i: (headers[i].instance_number, headers[i].path.name, headers[i].frame or 0),
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
            frames, header_fields, frame_rejections = read_frames(path)
        except SliceError as exc:
            rejected.append(Rejection(path.name, str(exc), exc.category))
            continue
        headers += frames
        rejected += frame_rejections
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


def decode_frame(ds: Dataset, header: SliceHeader) -> np.ndarray:
    """Decode one frame's stored values from an open dataset (SliceError when impossible)."""
    try:
        stored = pixel_array(ds, index=header.frame)
    except Exception as exc:  # decoders raise many types
        raise SliceError(
            f"{header.name}: undecodable pixel data ({type(exc).__name__}: {exc})", "undecodable"
        ) from exc
    if stored.shape != (header.rows, header.cols):
        raise SliceError(
            f"{header.name}: decoded shape {stored.shape} is not 2-D Rows x Cols", "undecodable"
        )
    return stored


def modality_values(stored: np.ndarray, header: SliceHeader) -> np.ndarray:
    """Stored values through the frame's Modality LUT, else its slope/intercept (float32)."""
    if header.modality_lut is not None:
        return apply_lut(stored, header.modality_lut)
    return apply_modality_lut(stored, header.slope, header.intercept)


def _open(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except Exception as exc:  # pydicom raises many types for broken files
        raise SliceError(
            f"{path.name}: unreadable DICOM ({type(exc).__name__}: {exc})", "unreadable"
        ) from exc


def decode_slice(header: SliceHeader, ds: Dataset | None = None) -> np.ndarray:
    """Decode one frame and apply its modality LUT (float32 [rows, cols])."""
    ds = _open(header.path) if ds is None else ds
    return modality_values(decode_frame(ds, header), header)


def load_slices(scan: SeriesScan, indices: Sequence[int] | None = None) -> SeriesVolume:
    """Decode the sorted slices at `indices` (all by default); failures go to `rejected`.

    Frames of one multi-frame file are decoded one at a time from a single open dataset.
    """
    wanted = range(len(scan.slices)) if indices is None else indices
    arrays, kept, rejected = [], [], list(scan.rejected)
    open_path: Path | None = None
    open_ds: Dataset | None = None
    for index in wanted:
        header = scan.slices[index]
        try:
            if header.path != open_path:
                open_path, open_ds = header.path, None
                open_ds = _open(header.path)
            if open_ds is None:
                raise SliceError(f"{header.name}: file could not be read", "unreadable")
            arrays.append(decode_slice(header, open_ds))
            kept.append(index)
        except SliceError as exc:
            rejected.append(Rejection(header.name, str(exc), exc.category))
    first = scan.slices[kept[0]] if kept else None
    shape = (0, first.rows, first.cols) if first else (0, 0, 0)
    return SeriesVolume(
        volume=np.stack(arrays).astype(np.float32) if arrays else np.zeros(shape, np.float32),
        slice_indices=kept,
        positions_mm=scan.positions_mm[kept] if kept else np.zeros(0),
        sop_uids=[scan.slices[i].sop_uid for i in kept],
        files=[scan.slices[i].name for i in kept],
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
