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
Every file that is not used is rejected with a plain reason (see :func:`read_frames` and
:func:`scan_series`): not an image storage class the cohort selects, another series' file,
a duplicate SOPInstanceUID, localizers (ImageType/FrameType LOCALIZER), colour or palette
images, a transfer syntax without an installed decoder, a frame larger than
``max_frame_pixels`` or whose encoded codestream disagrees with Rows/Columns (checked before
anything is decoded), missing/truncated pixel data, a rescale slope or intercept that is not a
number, an orientation without two valid direction cosines, a position that is not three
numbers, a file without position/orientation in a series whose other slices have them, and
frames whose matrix size or orientation differs from the series' majority.
"""

from __future__ import annotations

import math
import os
import struct
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID

from idc_diffusion.prepare.geometry import is_localizer, plane_name, slice_normal
from idc_diffusion.prepare.windowing import (
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
MAX_FRAME_PIXELS = 8192 * 8192  # default of prepare.max_frame_pixels
ITEM_TAG = b"\xfe\xff\x00\xe0"  # (FFFE,E000) little endian: an encapsulated fragment
CODESTREAM_HEAD = 8192  # bytes of the first fragment read to find its declared size
MIN_DIRECTION_NORM = 0.5  # |row| x |column|, or the sine of their angle, below this: unusable


@dataclass(frozen=True)
class ScanRules:
    """What a file must satisfy beyond being a readable greyscale image.

    `sop_classes`: the SOPClassUIDs accepted (None: any); `max_frame_pixels`: the largest
    Rows x Columns decoded; `need_pixel_spacing`: reject frames whose PixelSpacing is present
    but not two positive numbers (a field of view in mm needs it).
    """

    sop_classes: frozenset[str] | None = None
    max_frame_pixels: int = MAX_FRAME_PIXELS
    need_pixel_spacing: bool = False


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
    headers: list[SliceHeader]  # each decoded slice's header (photometric, windows, spacing)
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
    path: Path, rules: ScanRules = ScanRules()
) -> tuple[list[SliceHeader], dict[str, str | None], list[Rejection]]:
    """Parse one file's header (pixel data deferred) into one SliceHeader per usable frame.

    Returns the headers, the file's caption-relevant fields and the rejected frames (e.g.
    localizer frames of an enhanced object); SliceError if the file cannot be used at all.
    """
    ds = _open(path, defer_size="4 KB")
    headers, rejected = [], []
    try:
        _check_sop_class(ds, path, rules.sop_classes)
        frames = _check_pixel_data(ds, path, rules.max_frame_pixels)
        for frame in range(frames):
            try:
                headers.append(_frame_header(ds, path, frame if frames > 1 else None, rules))
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


def _check_sop_class(ds: Dataset, path: Path, accepted: frozenset[str] | None) -> None:
    """SliceError naming the SOP class unless it is one of the accepted image classes."""
    if accepted is None:
        return
    meta = getattr(ds, "file_meta", {})
    sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "").strip()
    if sop_class not in accepted:
        name = UID(sop_class).name if sop_class else "no SOPClassUID"
        raise SliceError(
            f"{path.name}: not an image series ({name} is not an image storage class "
            "the cohort selects)",
            "not_image",
        )


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
    for keyword, value, number in (
        ("RescaleSlope", slope_value, slope),
        ("RescaleIntercept", intercept_value, intercept),
    ):
        if value is not None and number is None:
            raise SliceError(f"{path.name}: {keyword} '{_text(value)}' is not a number", "rescale")
    if slope == 0:
        raise SliceError(f"{path.name}: RescaleSlope is 0 (all pixels would be equal)", "rescale")
    if slope is None and intercept is not None:
        raise SliceError(f"{path.name}: RescaleIntercept without RescaleSlope", "rescale")
    if (slope is None or intercept is None) and str(ds.get("Modality", "")).upper() == "CT":
        raise SliceError(
            f"{path.name}: CT image without RescaleSlope/RescaleIntercept (HU unknown)", "rescale"
        )
    return (1.0 if slope is None else slope), (intercept or 0.0), None


def _frame_header(
    ds: Dataset, path: Path, frame: int | None, rules: ScanRules = ScanRules()
) -> SliceHeader:
    """The SliceHeader of one frame (frame None: a single-frame file)."""
    where = path.name if frame is None else f"{path.name}:frame{frame + 1}"
    image_type = _frame_value(ds, frame, "CTImageFrameTypeSequence", "FrameType") or _frame_value(
        ds, frame, "MRImageFrameTypeSequence", "FrameType"
    )
    if is_localizer(ds.get("ImageType")) or is_localizer(image_type):
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
        orientation=_orientation(
            _frame_value(ds, frame, "PlaneOrientationSequence", "ImageOrientationPatient"), where
        ),
        position=_position(
            _frame_value(ds, frame, "PlanePositionSequence", "ImagePositionPatient"), where
        ),
        slope=slope,
        intercept=intercept,
        photometric=str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip(),
        window_center=windows[0][0] if windows else None,
        window_width=windows[0][1] if windows else None,
        frame=frame,
        pixel_spacing=_pixel_spacing(
            _frame_value(ds, frame, "PixelMeasuresSequence", "PixelSpacing"),
            where,
            rules.need_pixel_spacing,
        ),
        windows=tuple(windows),
        voi_luts=tuple(voi_luts),
        modality_lut=modality_lut,
    )


def _check_pixel_data(ds: Dataset, path: Path, max_frame_pixels: int = MAX_FRAME_PIXELS) -> int:
    """The number of frames; SliceError for pixel data that cannot or should not be decoded.

    Missing, truncated or non-greyscale pixel data, a transfer syntax without a decoder, and
    frames over `max_frame_pixels` or whose codestream declares another size than Rows x
    Columns are refused here, from the header and a few bytes, before any decoder allocates.
    """
    elem = ds.get_item(PIXEL_DATA_TAG, keep_deferred=True)
    if elem is None:
        raise SliceError(f"{path.name}: no PixelData", "no_pixel_data")
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        if keyword not in ds:
            raise SliceError(f"{path.name}: no {keyword}", "invalid_header")
    samples = ds.get("SamplesPerPixel", 1)
    if int(samples) != 1:
        raise SliceError(
            f"{path.name}: SamplesPerPixel {samples} is not supported (only greyscale images "
            "are used)",
            "photometric",
        )
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    if photometric not in GREYSCALE:
        raise SliceError(
            f"{path.name}: PhotometricInterpretation {photometric} is not supported (only "
            "greyscale MONOCHROME1/MONOCHROME2 images are used)",
            "photometric",
        )
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", {}):
        raise SliceError(f"{path.name}: no TransferSyntaxUID in the file meta", "invalid_header")
    syntax = ds.file_meta.TransferSyntaxUID
    problem = _decoder_problem(str(syntax))
    if problem:
        raise SliceError(f"{path.name}: TransferSyntaxUID {syntax} {problem}", "transfer_syntax")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if rows < 1 or cols < 1 or rows * cols > max_frame_pixels:
        raise SliceError(
            f"{path.name}: Rows x Columns {rows} x {cols} is outside 1..prepare.max_frame_pixels "
            f"({max_frame_pixels} pixels)",
            "frame_size",
        )
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError) as exc:
        raise SliceError(f"{path.name}: invalid NumberOfFrames ({exc})", "invalid_header") from exc
    if frames < 1:
        raise SliceError(f"{path.name}: NumberOfFrames {frames}", "invalid_header")
    length = getattr(elem, "length", None)
    tell = getattr(elem, "value_tell", None)
    if syntax.is_encapsulated:
        if tell is not None:  # each frame needs an item of at least its 8-byte header
            present = os.path.getsize(path) - tell
            if 8 * (frames + 1) > present:
                raise SliceError(
                    f"{path.name}: NumberOfFrames {frames} needs at least {8 * (frames + 1)} "
                    f"bytes of encapsulated PixelData, the file has {present}",
                    "truncated",
                )
            _check_codestream(path, tell, rows, cols)
        return frames
    if length is None or length == UNDEFINED_LENGTH:
        return frames
    if tell is not None and not syntax.is_deflated:  # deflated: offsets in inflated bytes
        size = os.path.getsize(path)
        if tell + length > size:
            raise SliceError(
                f"{path.name}: truncated file ({size} bytes, PixelData needs {tell + length})",
                "truncated",
            )
    expected = (rows * cols * frames * int(ds.BitsAllocated) + 7) // 8
    if length < expected:
        raise SliceError(
            f"{path.name}: PixelData has {length} bytes, expected {expected}", "truncated"
        )
    return frames


@cache
def _decoder_problem(syntax: str) -> str | None:
    """Why pixel data of a transfer syntax cannot be decoded here, or None."""
    if not UID(syntax).is_transfer_syntax:
        return "is not a transfer syntax pydicom knows (private or newer than pydicom)"
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        return f"({UID(syntax).name}) has no pixel data decoder in pydicom"
    if not decoder.is_available:
        return f"({UID(syntax).name}) has no installed decoder plugin"
    return None


def codestream_size(head: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares, None if not found.

    Reads the SOF/SOF55 segment of JPEG and JPEG-LS, the SIZ segment of JPEG 2000 (ISO
    10918-1 B.2.2, ISO 14495-1 C.2.2, ISO 15444-1 A.5.1); RLE carries no size.
    """
    siz = head.find(b"\xff\x4f\xff\x51")
    if siz >= 0 and len(head) >= siz + 24:
        xsiz, ysiz, xosiz, yosiz = struct.unpack(">4I", head[siz + 8 : siz + 24])
        return ysiz - yosiz, xsiz - xosiz
    if not head.startswith(b"\xff\xd8"):
        return None
    offset = 2
    while offset + 4 <= len(head):
        if head[offset] != 0xFF:
            return None
        marker = head[offset + 1]
        if marker == 0xFF:  # fill byte
            offset += 1
            continue
        (length,) = struct.unpack(">H", head[offset + 2 : offset + 4])
        is_sof = marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xF7) or (
            0xC9 <= marker <= 0xCF and marker != 0xCC
        )
        if is_sof and offset + 9 <= len(head):
            rows, cols = struct.unpack(">HH", head[offset + 5 : offset + 9])
            return (rows, cols) if rows else None  # 0 rows: height given later (DNL)
        if marker == 0xDA:  # start of scan before any frame header
            return None
        offset += 2 + length
    return None


def _check_codestream(path: Path, tell: int, rows: int, cols: int) -> None:
    """SliceError when the first fragment's codestream declares another size than the header."""
    with open(path, "rb") as handle:
        handle.seek(tell)
        offsets = handle.read(8)  # the Basic Offset Table item
        if len(offsets) < 8 or offsets[:4] != ITEM_TAG:
            raise SliceError(f"{path.name}: encapsulated PixelData has no items", "truncated")
        handle.seek(struct.unpack("<I", offsets[4:])[0], os.SEEK_CUR)
        item = handle.read(8)
        if len(item) < 8 or item[:4] != ITEM_TAG:
            raise SliceError(f"{path.name}: encapsulated PixelData has no fragment", "truncated")
        head = handle.read(min(struct.unpack("<I", item[4:])[0], CODESTREAM_HEAD))
    size = codestream_size(head)
    if size is not None and size != (rows, cols):
        raise SliceError(
            f"{path.name}: the encoded image is {size[0]} x {size[1]} but Rows x Columns say "
            f"{rows} x {cols}",
            "frame_size",
        )


def _text(value: object) -> str:
    """A DICOM value as written in the file: multiple values joined by a backslash."""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _orientation(value: object, where: str) -> tuple[float, ...] | None:
    """ImageOrientationPatient as 6 floats; None if absent, SliceError if unusable."""
    if value is None or value == "":
        return None
    numbers = _floats(value, 6)
    if numbers is not None:  # plain floats: this runs for every file of every series
        (a, b, c), (d, e, f) = numbers[:3], numbers[3:]
        lengths = math.hypot(a, b, c) * math.hypot(d, e, f)
        normal = math.hypot(b * f - c * e, c * d - a * f, a * e - b * d)
        if lengths > 0 and min(lengths, normal / lengths) >= MIN_DIRECTION_NORM:
            return numbers
    raise SliceError(
        f"{where}: ImageOrientationPatient '{_text(value)}' is not two valid direction cosines "
        "(zero, parallel or not 6 numbers)",
        "orientation",
    )


def _position(value: object, where: str) -> tuple[float, ...] | None:
    """ImagePositionPatient as 3 floats; None if absent, SliceError if not 3 numbers."""
    if value is None or value == "":
        return None
    numbers = _floats(value, 3)
    if numbers is None:
        raise SliceError(
            f"{where}: ImagePositionPatient '{_text(value)}' is not 3 numbers", "position"
        )
    return numbers


def _pixel_spacing(value: object, where: str, required: bool) -> tuple[float, ...] | None:
    """PixelSpacing as 2 positive floats; else None, or SliceError when `required`."""
    if value is None or value == "":
        return None
    numbers = _floats(value, 2)
    if numbers is not None and min(numbers) > 0:
        return numbers
    if required:
        raise SliceError(
            f"{where}: PixelSpacing '{_text(value)}' is not two positive numbers "
            "(field_of_view_mm needs the pixel size)",
            "pixel_spacing",
        )
    return None


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
    headers: list[SliceHeader], key, what: str, show=str
) -> tuple[list[SliceHeader], list[Rejection]]:
    """Keep headers whose key equals the majority; reject the others naming `what`."""
    if not headers:
        return headers, []
    majority = _majority(headers, key)
    kept = [h for h in headers if key(h) == majority]
    rejected = [
        Rejection(
            h.name,
            f"{h.name}: {what} {show(key(h))} differs from the majority {show(majority)}",
            what.replace(" ", "_"),
        )
        for h in headers
        if key(h) != majority
    ]
    return kept, rejected


def _cosines(values: Sequence[float]) -> str:
    return "\\".join(f"{v:g}" for v in values)


def _size(shape: tuple[int, int]) -> str:
    return f"{shape[0]} x {shape[1]}"


def _reject_without_geometry(
    headers: list[SliceHeader],
) -> tuple[list[SliceHeader], list[Rejection]]:
    """When most slices have orientation and position, reject those that lack either.

    A series where most slices lack them (projection images) keeps every slice.
    """
    placed = [h for h in headers if h.orientation is not None and h.position is not None]
    if len(placed) * 2 <= len(headers) or len(placed) == len(headers):
        return headers, []
    rejected = []
    for h in headers:
        if h.orientation is None or h.position is None:
            missing = "ImagePositionPatient" if h.position is None else "ImageOrientationPatient"
            reason = f"{h.name}: no {missing} (the series' other slices have one)"
            rejected.append(Rejection(h.name, reason, "no_geometry"))
    return placed, rejected


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


def _belongs(
    path: Path,
    frames: list[SliceHeader],
    fields: Mapping[str, str | None],
    series_uid: str | None,
    seen: dict[str, str],
) -> Rejection | None:
    """Why a readable file is not part of the series (other series, duplicate), or None.

    `seen` maps the SOPInstanceUIDs kept so far to their file names; it is updated.
    """
    found = fields.get("SeriesInstanceUID")
    if series_uid is not None and found != series_uid:
        reason = f"{path.name}: belongs to series {found or '(none)'}, not {series_uid}"
        return Rejection(path.name, reason, "other_series")
    sop_uid = frames[0].sop_uid if frames else ""
    if sop_uid and sop_uid in seen:
        reason = f"{path.name}: duplicate SOPInstanceUID of {seen[sop_uid]}"
        return Rejection(path.name, reason, "duplicate")
    if sop_uid:
        seen[sop_uid] = path.name
    return None


def scan_series(
    folder: Path, series_uid: str | None = None, rules: ScanRules = ScanRules()
) -> SeriesScan:
    """Read headers of every file in `folder`, reject unusable ones and sort the rest.

    With `series_uid`, files of any other series are rejected; of files sharing a
    SOPInstanceUID the first by name is kept.
    """
    headers: list[SliceHeader] = []
    fields: list[dict[str, str | None]] = []
    rejected: list[Rejection] = []
    seen: dict[str, str] = {}
    for path in list_files(folder):
        try:
            frames, header_fields, frame_rejections = read_frames(path, rules)
        except SliceError as exc:
            rejected.append(Rejection(path.name, str(exc), exc.category))
            continue
        outsider = _belongs(path, frames, header_fields, series_uid, seen)
        if outsider is not None:
            rejected.append(outsider)
            continue
        headers += frames
        rejected += frame_rejections
        fields.append(header_fields)
    headers, wrong_size = _reject_minority(
        headers, lambda h: (h.rows, h.cols), "matrix size", _size
    )
    headers, no_geometry = _reject_without_geometry(headers)
    wrong_orientation: list[Rejection] = []
    if headers and all(h.orientation is not None for h in headers):
        headers, wrong_orientation = _reject_minority(
            headers, lambda h: tuple(np.round(h.orientation, 3)), "orientation", _cosines
        )
    ordered, positions = sort_slices(headers)
    plane = plane_name(ordered[0].orientation) if ordered else None
    return SeriesScan(
        folder=folder,
        slices=ordered,
        positions_mm=positions,
        plane=plane,
        header=_merge_fields(fields),
        rejected=rejected + wrong_size + no_geometry + wrong_orientation,
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


def _open(path: Path, **options: Any) -> Dataset:
    """pydicom.dcmread, its failures turned into a plain SliceError."""
    try:
        return pydicom.dcmread(path, **options)
    except InvalidDicomError as exc:
        raise SliceError(
            f"{path.name}: not a DICOM file (no 128-byte preamble and 'DICM' prefix)",
            "unreadable",
        ) from exc
    except Exception as exc:  # pydicom raises many types for broken files
        message = str(exc).split(" Use force=True")[0]
        raise SliceError(
            f"{path.name}: unreadable DICOM ({type(exc).__name__}: {message})", "unreadable"
        ) from exc


def decode_slice(header: SliceHeader, ds: Dataset | None = None) -> np.ndarray:
    """Decode one frame and apply its modality LUT (float32 [rows, cols])."""
    ds = _open(header.path) if ds is None else ds
    return modality_values(decode_frame(ds, header), header)


def load_slices(
    scan: SeriesScan,
    indices: Sequence[int] | None = None,
    fallbacks: Mapping[int, Sequence[int]] | None = None,
) -> SeriesVolume:
    """Decode the sorted slices at `indices` (all by default); failures go to `rejected`.

    A slice that fails is replaced by the first of its `fallbacks` (sorted-stack indices, in
    order of preference) that decodes and is not wanted or tried already. Frames of one
    multi-frame file are decoded one at a time from a single open dataset.
    """
    wanted = list(range(len(scan.slices)) if indices is None else indices)
    tried = set(wanted)
    decoded: dict[int, np.ndarray] = {}
    rejected = list(scan.rejected)
    open_path: Path | None = None
    open_ds: Dataset | None = None
    for index in wanted:
        candidates = [index] + [i for i in (fallbacks or {}).get(index, ()) if i not in tried]
        for candidate in candidates:
            tried.add(candidate)
            header = scan.slices[candidate]
            try:
                if header.path != open_path:
                    open_path, open_ds = header.path, None
                    open_ds = _open(header.path)
                if open_ds is None:
                    raise SliceError(f"{header.name}: file could not be read", "unreadable")
                decoded[candidate] = decode_slice(header, open_ds)
                break
            except SliceError as exc:
                rejected.append(Rejection(header.name, str(exc), exc.category))
    kept = sorted(decoded)
    headers = [scan.slices[i] for i in kept]
    shape = (0, headers[0].rows, headers[0].cols) if headers else (0, 0, 0)
    return SeriesVolume(
        volume=np.stack([decoded[i] for i in kept]) if kept else np.zeros(shape, np.float32),
        slice_indices=kept,
        positions_mm=scan.positions_mm[kept] if kept else np.zeros(0),
        sop_uids=[h.sop_uid for h in headers],
        files=[h.name for h in headers],
        headers=headers,
        plane=scan.plane,
        header=scan.header,
        rejected=rejected,
    )


def read_series(folder: Path) -> SeriesVolume:
    """Scan, sort and decode every usable slice of a series folder."""
    return load_slices(scan_series(folder))
