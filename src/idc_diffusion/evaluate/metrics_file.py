"""metrics.json: every score of the run in one JSON document (fixed key order, NaN as null)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from idc_diffusion.evaluate.inputs import TrainingRecord


def assemble_metrics(
    identity: dict,
    pixel_source: list[str],
    scores: dict[str, dict],
    counts: dict[str, int],
    floor: dict | None,
    adherence: dict | None,
    training: TrainingRecord,
    settings: dict,
    notes: list[str],
) -> dict:
    """The JSON-safe content of metrics.json: the fine-tuned model's scores at the top level,
    ``counts`` added to its counts, the base model's beside them, then the references, the
    training record, the settings and the notes."""
    fine_tuned = scores["fine_tuned"]
    metrics = {
        "feature_extractor": identity,
        "pixel_source": pixel_source,
        **fine_tuned,
        "counts": {**fine_tuned["counts"], **counts},
        "base_model": scores.get("base"),
        "real_floor": floor,
        "adherence": adherence,
        "heldout_loss": heldout_losses(training.summary),
        "validation": {
            "heldout_loss": training.curve,
            "grids": [int(step) for step, _ in training.grids],
        },
        "train_summary": training.summary,
        "settings": settings,
        "notes": notes,
    }
    return json_safe(metrics)


def write_metrics(out_dir: Path, metrics: dict) -> None:
    """Write ``out_dir/metrics.json`` (indented, one trailing newline)."""
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")


def heldout_losses(summary: dict | None) -> dict[str, Any]:
    """Base and fine-tuned held-out loss with the relative improvement."""
    summary = summary or {}
    base, final = summary.get("heldout_loss_base"), summary.get("heldout_loss_final")
    rel = (base - final) / base if base and final is not None else None
    return {
        "base": base,
        "final": final,
        "relative_improvement": rel,
        "split": summary.get("heldout_split"),
        "images": summary.get("heldout_images"),
    }


def json_safe(value: Any) -> Any:
    """Recursively: NaN/inf → None, numpy scalars → Python, tuples → lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
