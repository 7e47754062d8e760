"""The prepare stage for one shard: DICOM series -> 8-bit PNG slices + captions + records.

Per series (only those the download report marks ``ok``; series run in a process pool of
``workers``, one series per worker at a time, so memory is bounded by the largest series'
selected slices whatever the shard size):

1. :func:`~idc_diffusion.prepare.series.scan_series` reads headers (single- and multi-frame) of the
   files of the row's series, rejects unusable files/frames (each with its reason: other
   series, duplicate SOPInstanceUIDs, SOP classes that are not the cohort's image storage
   classes, frames over ``max_frame_pixels``, ...) and localizers, and sorts the slices
   along the normal.
2. Slices are chosen by ``slice_selection``: ``band`` (default) takes ``slices_per_series``
   slices at the centres of equal sub-bands of ``slice_band`` (fractions of the sorted
   stack), ``uniform`` the same over the whole stack, ``positions`` the slices nearest to the
   ``slice_positions`` fractions of the stack's extent in mm along the normal. Projection
   radiographs (CR/DX/MG, or any series without geometry) take their images in
   InstanceNumber order, evenly thinned to ``slices_per_series``. A slice that fails to
   decode is replaced by the nearest usable slice of its sub-band.
3. Windows: CT uses the presets listed for its BodyPartExamined in ``ct_windows`` (else
   ``default``), one image per window, or one RGB image whose channels are the
   ``ct_composite`` presets. MR is normalised to its volume's ``mr_percentiles`` (window name
   ``percentile``; statistics from up to 32 evenly spaced slices). Radiographs and other
   modalities use each file's own VOI LUT Sequence item (``voi_lut``), else its
   WindowCenter/Width (``voi``), number ``voi_index`` (the last when there are fewer), else
   the series' percentiles.
   MONOCHROME1 images (PhotometricInterpretation of each file) are inverted after windowing
   so dense tissue is bright.
4. Quality filters, each counted in ``rejected`` by category: body fraction (CT: HU > -500;
   others: display value > 10) below ``min_body_fraction`` (``low_body_fraction``), and a
   display standard deviation below ``min_slice_std`` grey levels (``near_constant``).
5. Geometry: optional ``center_crop`` (fraction of each side kept), then, with
   ``field_of_view_mm`` and PixelSpacing, resampling to field_of_view_mm / resolution mm per
   pixel (centred crop or pad; a PixelSpacing that is not two positive numbers rejects the
   slice), else fitting the longer physical side to ``resolution`` (non-square pixels are
   stretched to their true aspect). The record's ``resize`` says which. Never flipped.
6. Captions from ``caption.parts`` (or ``caption.modality_parts[MODALITY]``); with
   ``caption.choice: random`` or ``caption.dropout`` > 0 the alternative and the dropped parts
   are drawn from a generator seeded by ``caption.seed`` and the image name. The caption's
   ``window`` field is the CT preset name only; ``voi``/``percentile`` carry no meaning for a
   reader. Captions over ``caption.max_tokens`` (estimated CLIP tokens) are logged and counted;
   an image whose caption would be empty is rejected (``empty_caption``), never written.
"""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from idc_diffusion.cohort.filter_sql import IMAGE_SOP_CLASSES
from idc_diffusion.core.captions import (
    CLIP_MAX_TOKENS,
    caption_fields,
    caption_rng,
    clip_token_count,
    parts_for,
    render_caption,
    validate_parts,
)
from idc_diffusion.core.rows import cell
from idc_diffusion.prepare.collection_terms import collection_terms
from idc_diffusion.prepare.delivered import check_dicom_present, download_rejections
from idc_diffusion.prepare.display_windows import Window, render, series_windows, voi_window
from idc_diffusion.prepare.geometry import axis_fractions, center_crop, resample_to_fov, third_of
from idc_diffusion.prepare.imaging import foreground_fraction, resize_square, write_png
from idc_diffusion.prepare.series import SeriesScan, SeriesVolume, load_slices, scan_series
from idc_diffusion.prepare.slice_header import MAX_FRAME_PIXELS, ScanRules, SliceHeader
from idc_diffusion.prepare.slice_selection import choose_slices
from idc_diffusion.prepare.table_rows import CAPTION_FIELDS, record_row, rejection_row, typed_frame

log = logging.getLogger(__name__)

CT_BODY_HU = -500.0
DISPLAY_FOREGROUND_LEVEL = 10.0
PROJECTION_MODALITIES = frozenset({"CR", "DX", "MG", "RF", "XA"})
ALL_IMAGE_SOP_CLASSES = frozenset(uid for uids in IMAGE_SOP_CLASSES.values() for uid in uids)

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
    "resize": "string",
    "SOPInstanceUID": "string",
    "window": "string",
    "window_center": "float64",
    "window_width": "float64",
    **{name: "string" for name in CAPTION_FIELDS},
    "pixel_source": "string",
    "license_short_name": "string",
    "text_tokens": "int64",
    "voi_index": "Int64",
}
REJECTED_DTYPES: dict[str, str] = {
    "SeriesInstanceUID": "string",
    "file": "string",
    "slice_index": "Int64",
    "stage": "string",
    "reason": "string",
    "category": "string",
}


def is_projection(modality: str | None, scan: SeriesScan) -> bool:
    """Projection radiographs: CR/DX-like modality, or no slice geometry at all."""
    no_geometry = bool(np.all(np.isnan(scan.positions_mm)))
    return (modality or "").upper() in PROJECTION_MODALITIES or no_geometry


def body_fraction(values: np.ndarray, display: np.ndarray, modality: str | None) -> float:
    """Body fraction: HU above -500 for CT, else display values above 10."""
    if (modality or "").upper() == "CT":
        return foreground_fraction(values, CT_BODY_HU)
    return foreground_fraction(display, DISPLAY_FOREGROUND_LEVEL)


def to_output(
    image: np.ndarray, spacing: Sequence[float] | None, settings: Mapping
) -> tuple[np.ndarray, str]:
    """Crop (optional), then resample to the field of view or fit the square (step 5).

    Returns the image and how it was resized: ``field_of_view`` or ``fit``.
    """
    crop = settings.get("center_crop")
    if crop:
        image = center_crop(image, float(crop))
    fov = settings.get("field_of_view_mm")
    size = int(settings["resolution"])
    if fov and spacing:
        return resample_to_fov(image, spacing, float(fov), size), "field_of_view"
    return resize_square(image, size, spacing), "fit"


def scan_rules(settings: Mapping[str, Any]) -> ScanRules:
    """What prepare asks of a series' files: an image storage class the cohort selects, the
    frame size limit, and a usable PixelSpacing when a field of view is configured."""
    return ScanRules(
        sop_classes=ALL_IMAGE_SOP_CLASSES,
        max_frame_pixels=int(settings.get("max_frame_pixels", MAX_FRAME_PIXELS)),
        need_pixel_spacing=bool(settings.get("field_of_view_mm")),
    )


@dataclass(frozen=True)
class SeriesJob:
    """What every slice of one series shares when its images are made and recorded."""

    row: Mapping[str, Any]
    uid: str
    modality: str
    body_part: str | None
    projection: bool
    scan: SeriesScan
    plane: str | None  # the decoded volume's plane
    thirds: np.ndarray  # each sorted slice's fraction of the scan's z extent
    parts: Sequence[Sequence[str]]  # the caption parts of the modality
    max_tokens: int
    settings: Mapping[str, Any]
    out_dir: Path
    shard: int
    pixel_source: str
    terms: tuple[str | None, str | None]


def prepare_series(
    row: Mapping[str, Any],
    series_dir: Path,
    out_dir: Path,
    settings: Mapping[str, Any],
    shard: int,
    pixel_source: str,
    terms: tuple[str | None, str | None] = (None, None),
) -> tuple[list[dict], list[dict]]:
    """Write one series' PNGs; return its records and rejections.

    `terms` is the collection's (cancer type, tumour location) for the caption.
    """
    uid = str(row["SeriesInstanceUID"])
    if not series_dir.is_dir():
        return [], [rejection_row(uid, f"series folder {series_dir.name} missing", "prepare")]
    scan = scan_series(series_dir, uid, scan_rules(settings))
    rejected = [
        rejection_row(uid, r.reason, "prepare", r.file, category=r.category) for r in scan.rejected
    ]
    if not scan.slices:
        return [], [*rejected, rejection_row(uid, _empty_series_reason(scan), "prepare")]
    modality = str(cell(row, "Modality") or scan.header["Modality"] or "").upper()
    body_part = cell(row, "BodyPartExamined") or scan.header["BodyPartExamined"]
    projection = is_projection(modality, scan)
    candidates = choose_slices(scan, projection, settings)
    volume = load_slices(scan, sorted(candidates), candidates)
    rejected += [
        rejection_row(uid, r.reason, "prepare", r.file, _index_of(scan, r.file), r.category)
        for r in volume.rejected[len(scan.rejected) :]
    ]
    own_voi, series_wins = slice_windows(modality, body_part, scan, volume, settings)
    caption = settings["caption"]
    job = SeriesJob(
        row=row,
        uid=uid,
        modality=modality,
        body_part=body_part,
        projection=projection,
        scan=scan,
        plane=volume.plane,
        thirds=axis_fractions(scan.z_mm),
        parts=parts_for(modality, caption),
        max_tokens=int(caption.get("max_tokens", CLIP_MAX_TOKENS)),
        settings=settings,
        out_dir=out_dir,
        shard=shard,
        pixel_source=pixel_source,
        terms=terms,
    )
    records = []
    for values, index, position, header in zip(
        volume.volume, volume.slice_indices, volume.positions_mm, volume.headers, strict=True
    ):
        own = own_voi.get(index)
        windows = [own] if own is not None else series_wins
        slice_records, slice_rejected = prepare_slice(job, values, index, position, header, windows)
        records += slice_records
        rejected += slice_rejected
    if not records:
        rejected.append(rejection_row(uid, "no usable slice in the series", "prepare"))
    return records, rejected


def slice_windows(
    modality: str,
    body_part: str | None,
    scan: SeriesScan,
    volume: SeriesVolume,
    settings: Mapping[str, Any],
) -> tuple[dict[int, Window | None], list[Window]]:
    """Each decoded slice's own VOI window (radiographs etc.; None where a file has none),
    and the series' windows for the slices shown without one (step 3)."""
    own_voi: dict[int, Window | None] = {}
    if modality not in ("CT", "MR"):
        pairs = zip(volume.slice_indices, volume.headers, strict=True)
        own_voi = {index: voi_window(header, settings) for index, header in pairs}
    series_wins = []
    if modality in ("CT", "MR") or None in own_voi.values():
        series_wins = series_windows(modality, body_part, scan, settings)
    return own_voi, series_wins


def prepare_slice(
    job: SeriesJob,
    values: np.ndarray,
    index: int,
    position: float,
    header: SliceHeader,
    windows: list[Window],
) -> tuple[list[dict], list[dict]]:
    """Render one decoded slice through its windows, filter it, caption and write its PNGs
    (steps 3 to 6); return its records and rejections."""
    file = header.name
    images = [render(values, w, header.photometric) for w in windows]
    problem = quality_problem(values, images[0], job.modality, job.settings)
    if problem is not None:
        category, reason = problem
        return [], [rejection_row(job.uid, f"{file}: {reason}", "prepare", file, index, category)]
    fields = slice_caption_fields(job, index)
    records, rejected = [], []
    for window, image in zip(windows, images, strict=True):
        name = f"images/{job.uid}_{index:04d}_{window.name}.png"
        fields = {**fields, "window": window.caption}
        text = caption_text(fields, job.parts, job.settings["caption"], name)
        if not text.strip():
            reason = f"{file}: empty caption (no field of any caption part is known)"
            rejected.append(rejection_row(job.uid, reason, "prepare", file, index, "empty_caption"))
            continue
        output, resize = to_output(image, header.pixel_spacing, job.settings)
        write_png(output, job.out_dir / name)
        tokens = clip_token_count(text)
        if tokens > job.max_tokens:
            log.warning("%s: caption has ~%d CLIP tokens (> %d)", name, tokens, job.max_tokens)
        slice_info = {
            "slice_index": index,
            "slice_position_mm": float(position),
            "resize": resize,
            "SOPInstanceUID": header.sop_uid,
            "text_tokens": tokens,
        }
        records.append(
            record_row(job.row, name, text, window, fields, slice_info, job.shard, job.pixel_source)
        )
    return records, rejected


def slice_caption_fields(job: SeriesJob, index: int) -> dict[str, str | None]:
    """The caption fields of the slice at sorted-stack `index` (the window is added per image)."""
    projection, scan = job.projection, job.scan
    return caption_fields(
        modality=job.modality,
        body_part=job.body_part,
        sex=cell(job.row, "PatientSex") or scan.header["PatientSex"],
        age=cell(job.row, "PatientAge") or scan.header["PatientAge"],
        plane=None if projection else job.plane,
        view_position=scan.header["ViewPosition"] if projection else None,
        contrast=scan.header.get("ContrastBolusAgent"),
        position=None if projection or job.plane != "axial" else third_of(job.thirds[index]),
        disease=job.terms[0],
        site=job.terms[1],
    )


def _empty_series_reason(scan: SeriesScan) -> str:
    """The series-level reason when no slice of a series is usable."""
    categories = {r.category for r in scan.rejected}
    if categories == {"not_image"}:
        return scan.rejected[0].reason.split(": ", 1)[1]  # "not an image series (...)"
    return f"no usable slice ({len(scan.rejected)} files rejected)"


def quality_problem(
    values: np.ndarray, display: np.ndarray, modality: str, settings: Mapping[str, Any]
) -> tuple[str, str] | None:
    """(category, reason) when a slice fails a quality filter, else None."""
    std = float(np.std(display))
    min_std = float(settings.get("min_slice_std", 0.0))
    if std < min_std:
        return "near_constant", f"display std {std:.2f} below min_slice_std {min_std}"
    fraction = body_fraction(values, display if display.ndim == 2 else display[..., 0], modality)
    if fraction < settings["min_body_fraction"]:
        return "low_body_fraction", (
            f"body fraction {fraction:.3f} below min_body_fraction {settings['min_body_fraction']}"
        )
    return None


def caption_text(
    fields: Mapping[str, Any],
    parts: Sequence[Sequence[str]],
    caption: Mapping[str, Any],
    image_name: str,
) -> str:
    """The caption of one image: seeded choice/dropout when configured, else deterministic."""
    random_choice = caption.get("choice", "first") == "random"
    dropout = float(caption.get("dropout", 0.0))
    rng = None
    if random_choice or dropout > 0:
        rng = caption_rng(int(caption.get("seed", 0)), image_name)
    return render_caption(
        fields,
        parts,
        caption["separator"],
        rng=rng,
        dropout=dropout,
        random_choice=random_choice,
    )


def _index_of(scan: SeriesScan, file: str) -> int | None:
    """Sorted-stack index of a file name in a scan."""
    return next((i for i, s in enumerate(scan.slices) if s.name == file), None)


def _series_task(task: tuple) -> tuple[list[dict], list[dict]]:
    """One pool task: prepare a series, turning any error into a rejection of that series."""
    row, series_dir, out_dir, settings, shard, pixel_source, terms = task
    uid = str(row["SeriesInstanceUID"])
    try:
        return prepare_series(row, series_dir, out_dir, settings, shard, pixel_source, terms)
    except Exception as exc:  # one bad series must not stop the shard
        log.exception("series %s failed", uid)
        return [], [
            rejection_row(uid, f"error: {type(exc).__name__}: {exc}", "prepare", category="error")
        ]


def run_tasks(tasks: list[tuple], workers: int) -> list[tuple[list[dict], list[dict]]]:
    """Results of every task, in task order: in-process, or in a pool of `workers` processes.

    The pool uses the spawn start method (no state inherited from the parent) and hands out
    one series per worker at a time (chunksize 1).
    """
    if workers <= 1 or len(tasks) <= 1:
        return [_series_task(t) for t in tasks]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
        return list(pool.map(_series_task, tasks, chunksize=1))


def prepare_shard(
    rows: pd.DataFrame,
    report: dict,
    dicom_dir: Path,
    out_dir: Path,
    settings: dict,
    shard: int,
    workers: int = 1,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Prepare one shard; write images/, records.parquet, rejected.parquet under out_dir."""
    caption = settings["caption"]
    validate_parts(caption["parts"])
    for modality, parts in (caption.get("modality_parts") or {}).items():
        try:
            validate_parts(parts)
        except ValueError as exc:
            raise ValueError(f"prepare.caption.modality_parts.{modality}: {exc}") from exc
    dicom_dir, out_dir = Path(dicom_dir), Path(out_dir)
    check_dicom_present(rows, report, dicom_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    for stale in images.glob("*.png"):
        stale.unlink()
    pixel_source = str(report.get("pixel_source", "idc"))
    failed = download_rejections(rows, report)
    terms = collection_terms(rows)
    rejected: list[dict] = []
    tasks = []
    for row in rows.sort_values("SeriesInstanceUID").to_dict("records"):
        uid = str(row["SeriesInstanceUID"])
        if uid in failed:
            rejected.append(failed[uid])
            continue
        collection = terms.get(str(row.get("collection_id")), (None, None))
        tasks.append((row, dicom_dir / uid, out_dir, settings, shard, pixel_source, collection))
    records: list[dict] = []
    for recs, rejs in run_tasks(tasks, workers):
        records += recs
        rejected += rejs
    record_frame = typed_frame(records, RECORD_DTYPES)
    rejected_frame = typed_frame(rejected, REJECTED_DTYPES)
    rejected_frame.to_parquet(out_dir / "rejected.parquet", index=False)
    if len(rows) and record_frame.empty:  # no records.parquet: the reasons are in rejected
        reasons = rejected_frame["reason"].value_counts().head(3).to_dict()
        raise ValueError(
            f"shard {shard}: 0 images from the cohort's {rows['SeriesInstanceUID'].nunique()} "
            f"series (commonest rejections: {reasons}; all in {out_dir / 'rejected.parquet'}); "
            f"check {dicom_dir} and the download report, or the prepare settings"
        )
    record_frame.to_parquet(out_dir / "records.parquet", index=False)
    long_captions = int((record_frame["text_tokens"] > caption.get("max_tokens", 77)).sum())
    log.info(
        "shard %d: %d images from %d series, %d rejections %s, %d captions over the token limit",
        shard,
        len(record_frame),
        record_frame["SeriesInstanceUID"].nunique(),
        len(rejected_frame),
        rejected_frame["category"].value_counts().to_dict(),
        long_captions,
    )
    return record_frame, rejected_frame
