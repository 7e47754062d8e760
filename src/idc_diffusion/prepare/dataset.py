"""Merge prepared shards into the Hugging Face *imagefolder* view.

``out_root/{train,val,test}/`` each hold their split's PNGs (hard links to the shard files,
copies where linking fails), named ``<shard folder>_<image name>``, and a ``metadata.jsonl``
whose lines carry ``file_name`` and ``text`` (what ``datasets.load_dataset("imagefolder")``
and diffusers' ``train_text_to_image.py`` read) plus provenance and structured fields.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from idc_diffusion.core.captions import CAPTION_FIELDS
from idc_diffusion.prepare.caption_stats import caption_statistics
from idc_diffusion.prepare.shard import REJECTED_DTYPES

SPLITS = ("train", "val", "test")
METADATA_FIELDS = (
    "text",
    "pixel_source",
    *CAPTION_FIELDS,
    "collection_id",
    "license_short_name",
    "SeriesInstanceUID",
    "slice_index",
)


def link_or_copy(src: Path, dst: Path) -> None:
    """Hard-link `src` to `dst` (replacing it); copy when the filesystem refuses links."""
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _plain(value: Any) -> Any:
    """A JSON-safe scalar: missing values and NaN become None, numpy scalars Python ones."""
    if value is None or value is pd.NA:
        return None
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def metadata_line(local_name: str, record: dict) -> str:
    """One metadata.jsonl line for an image."""
    entry = {"file_name": local_name}
    entry.update({key: _plain(record.get(key)) for key in METADATA_FIELDS})
    return json.dumps(entry, ensure_ascii=False, sort_keys=False)


def _shard_entries(shard_dir: Path) -> list[tuple[str, str, Path, dict]]:
    """(split, local name, source file, record) for every image of a shard."""
    records = pd.read_parquet(shard_dir / "records.parquet")
    entries = []
    for record in records.to_dict("records"):
        split = str(record["split"])
        if split not in SPLITS:
            raise ValueError(f"{shard_dir}: record {record['file_name']} has split {split!r}")
        text = record.get("text")
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{shard_dir}: record {record['file_name']} has an empty caption; "
                "rerun prepare for this shard"
            )
        local = f"{shard_dir.name}_{Path(record['file_name']).name}"
        entries.append((split, local, shard_dir / record["file_name"], record))
    return entries


def _merge_rejected(shard_dirs: list[Path]) -> pd.DataFrame:
    """Every shard's rejected.parquet with a `shard` column (the shard folder name)."""
    frames = []
    for shard_dir in shard_dirs:
        frame = pd.read_parquet(shard_dir / "rejected.parquet")
        if "category" not in frame:  # shards prepared before categories existed
            frame = frame.assign(category=pd.NA)
        frames.append(frame.assign(shard=shard_dir.name))
    columns = {**REJECTED_DTYPES, "shard": "string"}
    if not frames:
        return pd.DataFrame(columns=list(columns)).astype(columns)
    merged = pd.concat(frames, ignore_index=True)[list(columns)].astype(columns)
    return merged.sort_values(["shard", "SeriesInstanceUID", "file"], ignore_index=True)


def _download_summary(reports: list[Path]) -> tuple[dict[str, int], list[str]]:
    """Series counts per download status, and the pixel sources seen."""
    statuses: Counter[str] = Counter()
    sources = set()
    for path in reports:
        report = json.loads(Path(path).read_text())
        sources.add(str(report.get("pixel_source", "idc")))
        statuses.update(str(s.get("status")) for s in report.get("series", []))
    return dict(sorted(statuses.items())), sorted(sources)


def build_imagefolder(shard_dirs: list[Path], out_root: Path, download_reports: list[Path]) -> dict:
    """Build out_root/{train,val,test}/ (images + metadata.jsonl) and out_root/rejected.parquet.

    Returns, and writes to out_root/summary.json, image counts per split plus ``rejected``
    (rows), ``rejected_by_category`` and ``rejected_by_stage`` (quality-filter and bad-input
    counts), ``download_status`` (series per status from the download reports),
    ``pixel_source`` (sources seen) and ``captions`` (vocabulary, token-length histogram,
    most common captions; see :mod:`idc_diffusion.prepare.caption_stats`).
    """
    shard_dirs = sorted((Path(d) for d in shard_dirs), key=lambda d: d.name)
    out_root = Path(out_root)
    entries = [entry for d in shard_dirs for entry in _shard_entries(d)]
    names = Counter(local for _, local, _, _ in entries)
    duplicates = sorted(name for name, count in names.items() if count > 1)
    if duplicates:
        raise ValueError(f"image names collide across shards: {duplicates[:5]}")
    counts = {}
    for split in SPLITS:
        split_dir = out_root / split
        shutil.rmtree(split_dir, ignore_errors=True)
        split_dir.mkdir(parents=True)
        chosen = sorted((e for e in entries if e[0] == split), key=lambda e: e[1])
        lines = []
        for _, local, src, record in chosen:
            link_or_copy(src, split_dir / local)
            lines.append(metadata_line(local, record))
        text = "".join(line + "\n" for line in lines)
        (split_dir / "metadata.jsonl").write_text(text, encoding="utf-8")
        counts[split] = len(chosen)
    rejected = _merge_rejected(shard_dirs)
    rejected.to_parquet(out_root / "rejected.parquet", index=False)
    statuses, sources = _download_summary(download_reports)
    categories = rejected["category"].fillna("unknown") if "category" in rejected else []
    summary = {
        **counts,
        "rejected": len(rejected),
        "rejected_by_category": dict(sorted(Counter(categories).items())),
        "rejected_by_stage": dict(sorted(Counter(rejected["stage"].fillna("unknown")).items())),
        "download_status": statuses,
        "pixel_source": sources,
        "captions": caption_statistics([str(e[3]["text"]) for e in entries]),
    }
    (out_root / "summary.json").write_text(json.dumps(summary, indent=2, default=int) + "\n")
    return summary
