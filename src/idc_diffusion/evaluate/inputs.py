"""The evaluate stage's inputs other than images: the dataset's split metadata and rejected
inputs, the train stage's summary, log and validation grids, the cohort's summary and citations."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd


@dataclass(frozen=True)
class RunDirs:
    """The stage's folders: the fine-tuned model's samples, dataset, model, cohort and output."""

    samples: Path
    dataset: Path
    model: Path
    cohort: Path
    out: Path

    @property
    def figures(self) -> Path:
        """The report's figure folder."""
        return self.out / "figures"


@dataclass(frozen=True)
class Splits:
    """The metadata lines of the dataset's test, train and val splits."""

    test: list[dict]
    train: list[dict]
    val: list[dict]


@dataclass(frozen=True)
class TrainingRecord:
    """What the train stage left: summary, log, held-out loss curve, validation grids, and the
    training section's notes on what is missing."""

    summary: dict | None
    log: list[dict]
    curve: list[dict]
    grids: list[tuple[int, Path]]
    notes: list[str]


def read_splits(dataset_dir: Path) -> Splits:
    """The test, train and val metadata; ValueError naming the file without test images."""
    test_entries = read_metadata(dataset_dir / "test")
    if not test_entries:
        raise ValueError(f"{dataset_dir / 'test' / 'metadata.jsonl'}: no test images")
    train_entries = read_metadata(dataset_dir / "train")
    val_entries = read_metadata(dataset_dir / "val")
    return Splits(test_entries, train_entries, val_entries)


def read_metadata(split_dir: Path) -> list[dict]:
    """The lines of ``split_dir/metadata.jsonl`` (empty when the file is missing)."""
    path = Path(split_dir) / "metadata.jsonl"
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def read_json(path: Path) -> dict | None:
    """A JSON file's content, or None when missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_jsonl(path: Path) -> list[dict]:
    """A JSON-lines file's records (skipping bad lines), or [] when missing."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def read_text(path: Path) -> str | None:
    """A text file's content, or None when it cannot be read."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError:
        return None


def rejected_stats(path: Path, top: int = 8) -> dict[str, Any]:
    """Rejected-input count and top reasons (None when the file is missing)."""
    if not Path(path).is_file():
        return {"rejected": None, "top_reasons": []}
    frame = pd.read_parquet(path)
    reasons = Counter(str(r) for r in frame.get("reason", pd.Series(dtype=str)))
    return {"rejected": len(frame), "top_reasons": reasons.most_common(top)}


def read_training(model_dir: Path, notes: list[str]) -> TrainingRecord:
    """The train stage's summary, log, validation curve and grids.

    Appends to ``notes`` (the report's overview) when the summary or the log is missing; the
    record's own notes say what the training section lacks.
    """
    train_summary = read_json(model_dir / "train_summary.json")
    train_log = read_jsonl(model_dir / "train_log.jsonl")
    val_curve = validation_curve(train_log)
    grids = validation_grids(model_dir)
    if train_summary is None:
        notes.append(f"{model_dir / 'train_summary.json'} is missing: no held-out losses.")
    if not train_log:
        notes.append(f"{model_dir / 'train_log.jsonl'} is missing or empty: no loss curve.")
    training_notes = []
    if train_log and not val_curve:
        training_notes.append(
            f"{model_dir / 'train_log.jsonl'} has no val_loss lines: no validation-loss curve."
        )
    if not grids:
        training_notes.append(
            f"No validation grids ({model_dir / 'validation' / 'step-N.png'} not found)."
        )
    return TrainingRecord(train_summary, train_log, val_curve, grids, training_notes)


def validation_curve(log: list[dict]) -> list[dict]:
    """``{"step", "heldout_loss"}`` of the train-log lines written at validation steps.

    The trainer writes the held-out loss of a validation step as ``val_loss``.
    """
    return [
        {"step": int(r["step"]), "heldout_loss": float(r["val_loss"])}
        for r in log
        if r.get("val_loss") is not None and r.get("step") is not None
    ]


def validation_grids(model_dir: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of ``model_dir/validation/step-N.png``, by step."""
    found = []
    for path in (Path(model_dir) / "validation").glob("step-*.png"):
        step = path.stem.removeprefix("step-")
        if step.isdigit():
            found.append((int(step), path))
    return sorted(found)
