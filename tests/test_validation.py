"""Validation during training: held-out loss every N steps and a seeded prompt grid."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from train_fixtures import settings, write_dataset

from idc_diffusion.train.fine_tune import train
from idc_diffusion.train.models import build_tiny_pipeline
from idc_diffusion.train.validation import grid, save_validation_grid

PROVENANCE = {"cohort_summary": {"licenses": {"CC BY 4.0": 1}}, "pixel_source": "synthetic"}
PROMPTS = ["CT of the chest, axial slice", "MR of the brain"]


def records(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]


def test_grid_layout() -> None:
    tiles = [Image.new("L", (4, 3), color=10 * k) for k in range(5)]
    canvas = grid(tiles, columns=2)
    assert canvas.size == (8, 9)
    assert canvas.getpixel((5, 3)) == (30, 30, 30)  # tile 3: row 1, column 1
    with pytest.raises(ValueError, match="no images"):
        grid([], 2)


def test_grid_is_seeded(tmp_path: Path) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    first = save_validation_grid(pipeline, PROMPTS, tmp_path / "a", 7, 2, seed=3, steps=2)
    again = save_validation_grid(pipeline, PROMPTS, tmp_path / "b", 7, 2, seed=3, steps=2)
    other = save_validation_grid(pipeline, PROMPTS, tmp_path / "c", 7, 2, seed=4, steps=2)
    assert first == tmp_path / "a" / "validation" / "step-7.png"
    pixels = [np.asarray(Image.open(p)) for p in (first, again, other)]
    assert pixels[0].shape == (128, 128, 3)
    assert np.array_equal(pixels[0], pixels[1]) and not np.array_equal(pixels[0], pixels[2])
    assert not np.array_equal(pixels[0][:64, :64], pixels[0][:64, 64:])  # per-image seeds


def test_validation_every_n_steps_leaves_training_unchanged(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=4, val=2)
    common = {"max_steps": 5, "ema_decay": 0.5}
    options = {"validation_steps": 2, "validation_prompts": PROMPTS,
               "validation_images_per_prompt": 1, "validation_inference_steps": 2}  # fmt: skip
    summary = train(settings(**common, **options), data, tmp_path / "v", PROVENANCE)
    train(settings(**common), data, tmp_path / "plain", PROVENANCE)
    logged = records(tmp_path / "v")
    assert [r["step"] for r in logged if "val_loss" in r] == [2, 4, 5]
    assert logged[-1]["val_loss"] == pytest.approx(summary["heldout_loss_final"])
    names = sorted(p.name for p in (tmp_path / "v" / "validation").iterdir())
    assert names == ["step-2.png", "step-4.png", "step-5.png"]
    assert Image.open(tmp_path / "v" / "validation" / "step-2.png").size == (64, 128)
    plain = records(tmp_path / "plain")
    assert [r["loss"] for r in logged] == [r["loss"] for r in plain]  # no RNG consumed
    assert summary["ema"] is True
