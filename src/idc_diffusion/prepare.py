"""The prepare stage for one shard: DICOM series -> 8-bit PNG slices + captions + records.

Per series (only those the download report marks ``ok``):

1. :func:`~idc_diffusion.series.scan_series` reads headers, rejects unusable files and sorts
   the slices along the slice normal.
2. Slices are chosen: volumetric series take ``slices_per_series`` slices at the centres of
   equal sub-bands of ``slice_band`` (fractions of the sorted stack); projection radiographs
   (CR/DX, or any series without geometry) take their images in InstanceNumber order,
   evenly thinned to ``slices_per_series``.
3. Windows: CT uses the presets listed for its BodyPartExamined in ``ct_windows`` (else
   ``default``), one image per window. MR is normalised to its volume's ``mr_percentiles``
   (window name ``percentile``; statistics from up to 32 evenly spaced slices). Radiographs
   and other modalities use the file's first VOI window (name ``voi``), else percentiles.
   MONOCHROME1 images are inverted after windowing so dense tissue is bright.
4. Slices whose body fraction (CT: HU > -500; others: display value > 10) is below
   ``min_body_fraction`` are skipped and recorded in ``rejected``.
5. The caption's ``window`` field is the CT preset name only; ``voi``/``percentile`` carry no
   meaning for a reader, so radiograph and MR captions have no window part.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idc_diffusion.captions import caption_fields, render_caption, validate_parts
from idc_diffusion.imaging import foreground_fraction, resize_square, write_png
from idc_diffusion.rows import cell
from idc_diffusion.series import SeriesScan, load_slices, scan_series
from idc_diffusion.windowing import (
    invert_if_monochrome1,
    normalise_to_uint8,
    percentile_range,
    voi_window,
    window_to_uint8,
)

log = logging.getLogger(__name__)

CT_BODY_HU = -500.0
DISPLAY_FOREGROUND_LEVEL = 10.0
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA"})
STATS_MAX_SLICES = 32
CAPTION_FIELDS = ("modality", "body_part", "plane", "view", "sex", "age_band")

RECORD_DTYPES: dict[str, str] = {
    "file_name": "string",
    "text": "string",
    "split": "string",
    "SeriesInstanceUID": "string",
    "StudyInstanceUID": "string",
    "collection_id": "string",
    "stratum": "string",
    "shard": "int64",
    "slice_index": "int64",
    "slice_position_mm": "float64",
    "SOPInstanceUID": "string",
    "window": "string",
    "window_center": "float64",
    "window_width": "float64",
    **{name: "string" for name in CAPTION_FIELDS},
    "pixel_source": "string",
    "license_short_name": "string",
}
REJECTED_DTYPES: dict[str, str] = {
    "SeriesInstanceUID": "string",
    "file": "string",
    "slice_index": "Int64",
    "stage": "string",
    "reason": "string",
}


@dataclass(frozen=True)
class Window:
    """How one output image of a slice is made from its values."""

    name: str  # record's window name: a CT preset, "voi" or "percentile"
    center: float | None  # linear window (CT preset or VOI); None for percentile
    width: float | None
    low: float | None = None  # percentile range; None for linear windows
    high: float | None = None
    caption: str | None = None  # caption's {window} field; only CT presets have one


def select_indices(n: int, k: int, band: Sequence[float] = (0.0, 1.0)) -> list[int]:
    """k slice indices of an n-slice stack at the centres of k equal sub-bands of `band`."""
    if n <= 0:
        return []
    lo, hi = band
    centres = lo + (hi - lo) * (np.arange(k) + 0.5) / k
    return sorted({int(i) for i in np.clip(np.rint(centres * (n - 1)), 0, n - 1)})


def ct_windows(body_part: str | None, settings: Mapping[str, Any]) -> list[Window]:
    """The CT presets configured for a body part (``default`` for any other)."""
    table = settings["ct_windows"]
    names = table.get((body_part or "").strip().upper(), table["default"])
    presets = settings["window_presets"]
    return [
        Window(name, float(presets[name]["center"]), float(presets[name]["width"]), caption=name)
        for name in names
    ]


def percentile_window(values: np.ndarray, percentiles: Sequence[float]) -> Window:
    """A 'percentile' window spanning the given percentiles of `values`."""
    low, high = percentile_range(values, *percentiles)
    return Window("percentile", None, None, low=low, high=high)


def render(values: np.ndarray, window: Window, photometric: str) -> np.ndarray:
    """One slice's values through a window to display uint8 (MONOCHROME1 inverted)."""
    if window.center is not None and window.width is not None:
        image = window_to_uint8(values, window.center, window.width)
    else:
        image = normalise_to_uint8(values, window.low or 0.0, window.high or 0.0)
    return invert_if_monochrome1(image, photometric)


def is_projection(modality: str | None, scan: SeriesScan) -> bool:
    """Projection radiographs: CR/DX-like modality, or no slice geometry at all."""
    no_geometry = bool(np.all(np.isnan(scan.positions_mm)))
    return (modality or "").upper() in PROJECTION_MODALITIES or no_geometry


def body_fraction(values: np.ndarray, display: np.ndarray, modality: str | None) -> float:
    """Body fraction: HU above -500 for CT, else display values above 10."""
    if (modality or "").upper() == "CT":
        return foreground_fraction(values, CT_BODY_HU)
    return foreground_fraction(display, DISPLAY_FOREGROUND_LEVEL)


def _reject(
    uid: str, reason: str, stage: str, file: str | None = None, index: int | None = None
) -> dict:
    return {
        "SeriesInstanceUID": uid,
        "file": file,
        "slice_index": index,
        "stage": stage,
        "reason": reason,
    }


def _stats_indices(n: int) -> list[int]:
    return select_indices(n, min(n, STATS_MAX_SLICES))


def series_windows(
    modality: str, body_part: str | None, scan: SeriesScan, settings: Mapping[str, Any]
) -> list[Window]:
    """The windows one series is rendered with (see the module docstring)."""
    if modality == "CT":
        return ct_windows(body_part, settings)
    if modality != "MR":
        first = scan.slices[0]
        voi = voi_window(first.window_center, first.window_width)
        if voi is not None:
            return [Window("voi", voi[0], voi[1])]
    stats = load_slices(scan, _stats_indices(len(scan.slices))).volume
    return [percentile_window(stats, settings["mr_percentiles"])]


def prepare_series(
    row: Mapping[str, Any],
    series_dir: Path,
    out_dir: Path,
    settings: Mapping[str, Any],
    shard: int,
    pixel_source: str,
) -> tuple[list[dict], list[dict]]:
    """Write one series' PNGs; return its records and rejections."""
    uid = str(row["SeriesInstanceUID"])
    if not series_dir.is_dir():
        return [], [_reject(uid, f"series folder {series_dir.name} missing", "prepare")]
    scan = scan_series(series_dir)
    rejected = [_reject(uid, r.reason, "prepare", r.file) for r in scan.rejected]
    if not scan.slices:
        reason = f"no usable slice ({len(scan.rejected)} files rejected)"
        return [], [*rejected, _reject(uid, reason, "prepare")]
    modality = str(cell(row, "Modality") or scan.header["Modality"] or "").upper()
    body_part = cell(row, "BodyPartExamined") or scan.header["BodyPartExamined"]
    projection = is_projection(modality, scan)
    band = (0.0, 1.0) if projection else settings["slice_band"]
    indices = select_indices(len(scan.slices), settings["slices_per_series"], band)
    volume = load_slices(scan, indices)
    rejected += [
        _reject(uid, r.reason, "prepare", r.file, _index_of(scan, r.file))
        for r in volume.rejected[len(scan.rejected) :]
    ]
    windows = series_windows(modality, body_part, scan, settings)
    records = []
    for values, index, position, sop, file in zip(
        volume.volume,
        volume.slice_indices,
        volume.positions_mm,
        volume.sop_uids,
        volume.files,
        strict=True,
    ):
        images = [render(values, w, volume.photometric) for w in windows]
        fraction = body_fraction(values, images[0], modality)
        if fraction < settings["min_body_fraction"]:
            reason = (
                f"{file}: body fraction {fraction:.3f} below min_body_fraction "
                f"{settings['min_body_fraction']}"
            )
            rejected.append(_reject(uid, reason, "prepare", file, index))
            continue
        for window, image in zip(windows, images, strict=True):
            name = f"images/{uid}_{index:04d}_{window.name}.png"
            write_png(resize_square(image, settings["resolution"]), out_dir / name)
            fields = caption_fields(
                modality=modality,
                body_part=body_part,
                sex=cell(row, "PatientSex") or scan.header["PatientSex"],
                age=cell(row, "PatientAge") or scan.header["PatientAge"],
                plane=None if projection else volume.plane,
                view_position=scan.header["ViewPosition"] if projection else None,
                window=window.caption,
            )
            text = render_caption(
                fields, settings["caption"]["parts"], settings["caption"]["separator"]
            )
            slice_info = {
                "slice_index": index,
                "slice_position_mm": float(position),
                "SOPInstanceUID": sop,
            }
            records.append(
                _record(row, name, text, window, fields, slice_info, shard, pixel_source)
            )
    if not records:
        rejected.append(_reject(uid, "no usable slice in the series", "prepare"))
    return records, rejected


def _record(
    row: Mapping[str, Any],
    file_name: str,
    text: str,
    window: Window,
    fields: Mapping[str, str | None],
    slice_info: Mapping[str, Any],
    shard: int,
    pixel_source: str,
) -> dict:
    """One records.parquet row (columns as in RECORD_DTYPES)."""
    return {
        "file_name": file_name,
        "text": text,
        "split": cell(row, "split"),
        "SeriesInstanceUID": str(row["SeriesInstanceUID"]),
        "StudyInstanceUID": cell(row, "StudyInstanceUID"),
        "collection_id": cell(row, "collection_id"),
        "stratum": cell(row, "stratum"),
        "shard": shard,
        **slice_info,
        "window": window.name,
        "window_center": np.nan if window.center is None else window.center,
        "window_width": np.nan if window.width is None else window.width,
        **{k: fields[k] for k in CAPTION_FIELDS},
        "pixel_source": pixel_source,
        "license_short_name": cell(row, "license_short_name"),
    }


def _index_of(scan: SeriesScan, file: str) -> int | None:
    """Sorted-stack index of a file name in a scan."""
    return next((i for i, s in enumerate(scan.slices) if s.path.name == file), None)


def _frame(rows: list[dict], dtypes: Mapping[str, str]) -> pd.DataFrame:
    """A DataFrame with exactly `dtypes`' columns and types (also when empty)."""
    frame = pd.DataFrame(rows, columns=list(dtypes))
    return frame.astype(dict(dtypes))


def _download_rejections(rows: pd.DataFrame, report: Mapping[str, Any]) -> dict[str, dict]:
    """Series the download stage did not deliver intact, keyed by UID."""
    entries = {str(s["SeriesInstanceUID"]): s for s in report.get("series", [])}
    out = {}
    for uid in rows["SeriesInstanceUID"].astype(str):
        entry = entries.get(uid, {"status": "missing", "reason": "not in the download report"})
        if entry.get("status") != "ok":
            reason = f"download {entry.get('status')}: {entry.get('reason') or ''}".strip()
            out[uid] = _reject(uid, reason, "download")
    return out


def prepare_shard(
    rows: pd.DataFrame,
    report: dict,
    dicom_dir: Path,
    out_dir: Path,
    settings: dict,
    shard: int,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prepare one shard; write images/, records.parquet, rejected.parquet under out_dir."""
    validate_parts(settings["caption"]["parts"])
    dicom_dir, out_dir = Path(dicom_dir), Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob("*.png"):
        stale.unlink()
    pixel_source = str(report.get("pixel_source", "idc"))
    failed = _download_rejections(rows, report)
    records: list[dict] = []
    rejected: list[dict] = []
    for row in rows.sort_values("SeriesInstanceUID").to_dict("records"):
        uid = str(row["SeriesInstanceUID"])
        if uid in failed:
            rejected.append(failed[uid])
            continue
        try:
            recs, rejs = prepare_series(
                row, dicom_dir / uid, out_dir, settings, shard, pixel_source
            )
        except Exception as exc:  # one bad series must not stop the shard
            log.exception("series %s failed", uid)
            recs, rejs = [], [_reject(uid, f"error: {type(exc).__name__}: {exc}", "prepare")]
        records += recs
        rejected += rejs
    record_frame = _frame(records, RECORD_DTYPES)
    rejected_frame = _frame(rejected, REJECTED_DTYPES)
    record_frame.to_parquet(out_dir / "records.parquet", index=False)
    rejected_frame.to_parquet(out_dir / "rejected.parquet", index=False)
    log.info(
        "shard %d: %d images from %d series, %d rejections",
        shard,
        len(record_frame),
        record_frame["SeriesInstanceUID"].nunique(),
        len(rejected_frame),
    )
    return record_frame, rejected_frame
