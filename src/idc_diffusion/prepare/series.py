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
Every file that is not used is rejected with a plain reason (see
:func:`~idc_diffusion.prepare.frames.read_frames` and :func:`scan_series`): not an image
storage class the cohort selects, another series' file, a duplicate SOPInstanceUID,
localizers (ImageType/FrameType LOCALIZER), colour or palette images, a transfer syntax
without an installed decoder, a frame larger than ``max_frame_pixels`` or whose encoded
codestream disagrees with Rows/Columns (checked before anything is decoded), missing/truncated
pixel data, a rescale slope or intercept that is not a number, an orientation without two
valid direction cosines, a position that is not three numbers, a file without
position/orientation in a series whose other slices have them, and frames whose matrix size
or orientation differs from the series' majority.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from idc_diffusion.prepare.frames import HEADER_KEYWORDS, open_dataset, read_frames
from idc_diffusion.prepare.geometry import plane_name
from idc_diffusion.prepare.slice_header import (
    DEFAULT_RULES,
    Rejection,
    ScanRules,
    SliceError,
    SliceHeader,
)
from idc_diffusion.prepare.slice_order import consistent_slices, sort_slices
from idc_diffusion.prepare.windowing import apply_lut, apply_modality_lut


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
    folder: Path, series_uid: str | None = None, rules: ScanRules = DEFAULT_RULES
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
    headers, inconsistent = consistent_slices(headers)
    ordered, positions = sort_slices(headers)
    plane = plane_name(ordered[0].orientation) if ordered else None
    return SeriesScan(
        folder=folder,
        slices=ordered,
        positions_mm=positions,
        plane=plane,
        header=_merge_fields(fields),
        rejected=rejected + inconsistent,
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


def decode_slice(header: SliceHeader, ds: Dataset | None = None) -> np.ndarray:
    """Decode one frame and apply its modality LUT (float32 [rows, cols])."""
    ds = open_dataset(header.path) if ds is None else ds
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
                    open_ds = open_dataset(header.path)
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
