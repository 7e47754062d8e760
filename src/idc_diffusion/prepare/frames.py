"""One DICOM file's header (pixel data deferred) as a :class:`SliceHeader` per usable frame.

Frames of enhanced multi-frame objects take position, orientation, rescale, window and pixel
spacing from their Per-Frame Functional Groups (falling back to the Shared Functional Groups,
then the top level). Unusable values (rescale, orientation, position, pixel spacing) raise
:class:`SliceError` with the reason.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.uid import UID

from idc_diffusion.prepare.geometry import is_localizer
from idc_diffusion.prepare.pixel_data import check_pixel_data
from idc_diffusion.prepare.slice_header import (
    DEFAULT_RULES,
    Rejection,
    ScanRules,
    SliceError,
    SliceHeader,
)
from idc_diffusion.prepare.windowing import Lut, first_value, lut_from_item, voi_windows

MIN_DIRECTION_NORM = 0.5  # |row| x |column|, or the sine of their angle, below this: unusable


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
    path: Path, rules: ScanRules = DEFAULT_RULES
) -> tuple[list[SliceHeader], dict[str, str | None], list[Rejection]]:
    """Parse one file's header (pixel data deferred) into one SliceHeader per usable frame.

    Returns the headers, the file's caption-relevant fields and the rejected frames (e.g.
    localizer frames of an enhanced object); SliceError if the file cannot be used at all.
    """
    ds = open_dataset(path, defer_size="4 KB")
    headers, rejected = [], []
    try:
        _check_sop_class(ds, path, rules.sop_classes)
        frames = check_pixel_data(ds, path, rules.max_frame_pixels)
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
    """The caption-relevant HEADER_KEYWORDS of a file (None when absent or empty)."""
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
    ds: Dataset, path: Path, frame: int | None, rules: ScanRules = DEFAULT_RULES
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
    """The first value of an element as a float, else `default`."""
    number = first_value(value)
    return default if number is None else number


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """n finite floats from a multi-valued element, else None."""
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == n and np.all(np.isfinite(numbers)) else None


def open_dataset(path: Path, **options: Any) -> Dataset:
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
