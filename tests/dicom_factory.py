"""Build small, valid DICOM files and series with pydicom for the tests.

Every generator writes uncompressed Explicit VR Little Endian files with known stored
values, so expected pixel values can be computed by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
SOP_CLASS = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
}
PATIENT_ID = "PAT-SECRET-0042"
PATIENT_NAME = "Doe^Jane"
STUDY_DATE = "20240229"


def make_dataset(
    pixels: np.ndarray,
    modality: str,
    series_uid: str,
    study_uid: str,
    *,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
) -> Dataset:
    """One single-frame image dataset whose stored values are exactly `pixels`."""
    pixels = np.asarray(pixels)
    signed = pixels.dtype.kind == "i"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SOP_CLASS[modality]
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = modality
    ds.PatientID = PATIENT_ID
    ds.PatientName = PATIENT_NAME
    ds.StudyDate = STUDY_DATE
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    if slope is not None:
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept if intercept is not None else 0
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    return ds


def save(ds: Dataset, path: Path) -> Path:
    """Write `ds` as a DICOM Part 10 file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _normal(orientation: Sequence[float]) -> np.ndarray:
    return np.cross(np.asarray(orientation[:3]), np.asarray(orientation[3:]))


def write_volume(
    folder: Path,
    stored: np.ndarray,
    modality: str = "CT",
    *,
    orientation: Sequence[float] = AXIAL,
    spacing: float = 2.5,
    origin: Sequence[float] = (0.0, 0.0, 0.0),
    slope: float | None = 1.0,
    intercept: float | None = -1024.0,
    file_order: Sequence[int] | None = None,
    instance_numbers: bool = True,
    series_uid: str | None = None,
    study_uid: str | None = None,
    extra: dict | None = None,
) -> tuple[str, list[Path]]:
    """Write `stored[k]` as slice k at origin + k*spacing*normal.

    `file_order[j]` is the slice written to file name `j`, so names can disagree with anatomy.
    Returns the series UID and the files, indexed by slice k.
    """
    series_uid = series_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    n = stored.shape[0]
    order = list(file_order) if file_order is not None else list(range(n))
    normal = _normal(orientation)
    paths: list[Path] = [Path()] * n
    for j, k in enumerate(order):
        ds = make_dataset(
            stored[k], modality, series_uid, study_uid, slope=slope, intercept=intercept
        )
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + k * spacing * normal]
        ds.PixelSpacing = [0.7, 0.7]
        ds.SliceThickness = spacing
        if instance_numbers:
            ds.InstanceNumber = n - k  # deliberately opposite to the anatomy
        for key, value in (extra or {}).items():
            setattr(ds, key, value)
        paths[k] = save(ds, folder / f"IMG{j:04d}.dcm")
    return series_uid, paths


def ct_phantom(n: int, size: int, *, intercept: float = -1024.0, slope: float = 1.0) -> np.ndarray:
    """Stored values of a CT phantom: air outside a disc of water, a bone square in the middle.

    Slice k adds k HU to the water so slices are distinguishable.
    """
    yy, xx = np.mgrid[:size, :size]
    r = size / 2
    disc = (yy - r + 0.5) ** 2 + (xx - r + 0.5) ** 2 <= (0.4 * size) ** 2
    square = (abs(yy - r + 0.5) < size / 8) & (abs(xx - r + 0.5) < size / 8)
    vol = np.empty((n, size, size), np.float64)
    for k in range(n):
        hu = np.full((size, size), -1000.0)
        hu[disc] = float(k)
        hu[square] = 700.0
        vol[k] = hu
    return np.rint((vol - intercept) / slope).astype(np.int16)


def write_radiograph(
    path: Path,
    stored: np.ndarray,
    *,
    modality: str = "CR",
    center: float | Sequence[float] | None = 2048.0,
    width: float | Sequence[float] | None = 4096.0,
    photometric: str = "MONOCHROME1",
    instance_number: int | None = 1,
    view_position: str | None = "PA",
    series_uid: str | None = None,
    study_uid: str | None = None,
) -> Path:
    """A single projection radiograph without patient position, optionally with a VOI window."""
    ds = make_dataset(
        stored,
        modality,
        series_uid or generate_uid(),
        study_uid or generate_uid(),
        photometric=photometric,
    )
    if center is not None:
        ds.WindowCenter = center
        ds.WindowWidth = width
    if instance_number is not None:
        ds.InstanceNumber = instance_number
    if view_position is not None:
        ds.ViewPosition = view_position
    ds.BodyPartExamined = "CHEST"
    return save(ds, path)


def truncate(path: Path, keep_fraction: float = 0.6) -> Path:
    """Cut a file short inside its pixel data, as an interrupted download would."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep_fraction)])
    return path


def strip_pixels(path: Path) -> Path:
    """Rewrite a file without its PixelData element."""
    from pydicom import dcmread

    ds = dcmread(path)
    del ds.PixelData
    ds.save_as(path, enforce_file_format=True)
    return path


def prepare_settings(**overrides: object) -> dict:
    """The prepare section of the config with its documented defaults, plus overrides."""
    settings: dict = {
        "resolution": 512,
        "slices_per_series": 8,
        "slice_band": [0.1, 0.9],
        "min_body_fraction": 0.05,
        "window_presets": {
            "lung": {"center": -600, "width": 1500},
            "mediastinum": {"center": 50, "width": 350},
            "bone": {"center": 400, "width": 1800},
            "brain": {"center": 40, "width": 80},
            "abdomen": {"center": 50, "width": 400},
        },
        "ct_windows": {
            "CHEST": ["lung", "mediastinum"],
            "LUNG": ["lung", "mediastinum"],
            "HEAD": ["brain", "bone"],
            "BRAIN": ["brain", "bone"],
            "default": ["abdomen"],
        },
        "mr_percentiles": [1.0, 99.0],
        "caption": {
            "separator": ", ",
            "parts": [
                ["{modality} of the {body_part}", "{modality}"],
                ["{plane} slice", "{view} view"],
                ["{window} window"],
                ["{sex}"],
                ["{age_band}"],
            ],
        },
    }
    settings.update(overrides)
    return settings


def write_enhanced(
    path: Path,
    stored: np.ndarray,
    z_positions: Sequence[float],
    *,
    modality: str = "CT",
    orientation: Sequence[float] = AXIAL,
    slopes: Sequence[float] | None = None,
    intercept: float = -1024.0,
    frame_types: Sequence[str] | None = None,
) -> Path:
    """An enhanced multi-frame image: frame k at z_positions[k] with rescale slopes[k].

    Orientation and pixel spacing sit in the Shared Functional Groups; position, rescale and
    frame type per frame, as enhanced CT/MR objects write them.
    """
    ds = make_dataset(stored[0], modality, generate_uid(), generate_uid())
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_SOP_CLASS[modality]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.NumberOfFrames = stored.shape[0]
    ds.PixelData = stored.astype("<i2").tobytes()
    shared = Dataset()
    shared.PlaneOrientationSequence = [Dataset()]
    shared.PlaneOrientationSequence[0].ImageOrientationPatient = [float(v) for v in orientation]
    shared.PixelMeasuresSequence = [Dataset()]
    shared.PixelMeasuresSequence[0].PixelSpacing = [0.5, 0.5]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames = []
    for k, z in enumerate(z_positions):
        item = Dataset()
        item.PlanePositionSequence = [Dataset()]
        item.PlanePositionSequence[0].ImagePositionPatient = [0.0, 0.0, float(z)]
        item.PixelValueTransformationSequence = [Dataset()]
        transform = item.PixelValueTransformationSequence[0]
        transform.RescaleSlope = float(slopes[k]) if slopes is not None else 1.0
        transform.RescaleIntercept = intercept
        frame_type = ["ORIGINAL", "PRIMARY", (frame_types or ["AXIAL"] * len(z_positions))[k]]
        sequence = "CTImageFrameTypeSequence" if modality == "CT" else "MRImageFrameTypeSequence"
        setattr(item, sequence, [Dataset()])
        getattr(item, sequence)[0].FrameType = frame_type
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    return save(ds, path)


ENHANCED_SOP_CLASS = {"CT": "1.2.840.10008.5.1.4.1.1.2.1", "MR": "1.2.840.10008.5.1.4.1.1.4.1"}


def replace_bytes(path: Path, old: bytes, new: bytes, pad: bytes = b" ") -> Path:
    """Overwrite the single occurrence of `old` in a file with `new` padded to its length.

    Writes values no encoder would (a text or NaN DS, a zero spacing) exactly as a faulty
    writer leaves them in the file.
    """
    data = path.read_bytes()
    if data.count(old) != 1 or len(new) > len(old):
        raise ValueError(f"{path.name}: {old!r} is not unique or {new!r} is longer")
    path.write_bytes(data.replace(old, new.ljust(len(old), pad)))
    return path


def rewrite(
    path: Path,
    *,
    remove: Sequence[str] = (),
    meta: dict | None = None,
    **values: object,
) -> Path:
    """Re-save a file with elements removed, set (`values`) and file meta elements set.

    A transfer syntax pydicom does not know is written as Explicit VR Little Endian, as
    archives holding private syntaxes do.
    """
    from pydicom import dcmread

    ds = dcmread(path)
    for keyword in remove:
        delattr(ds, keyword)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    for keyword, value in (meta or {}).items():
        setattr(ds.file_meta, keyword, value)
    syntax = ds.file_meta.TransferSyntaxUID
    if syntax.is_transfer_syntax:
        ds.save_as(path, enforce_file_format=True)
        return path
    # pydicom writes no unknown public syntax (e.g. JPEG XL): write a private stand-in
    stand_in = "9" * len(syntax)
    ds.file_meta.TransferSyntaxUID = stand_in
    ds.save_as(path, enforce_file_format=True, implicit_vr=False, little_endian=True)
    return replace_bytes(path, stand_in.encode(), str(syntax).encode(), pad=b"\0")


def write_j2k(path: Path, stored: np.ndarray, modality: str = "CT", **values: object) -> Path:
    """A single-frame JPEG 2000 lossless file of `stored`, then `values` set on it (e.g. Rows
    and Columns that disagree with the codestream)."""
    from pydicom.uid import JPEG2000Lossless

    ds = make_dataset(stored, modality, generate_uid(), generate_uid(), slope=1, intercept=-1024)
    ds.compress(JPEG2000Lossless)
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return save(ds, path)
