"""A tiny imagefolder dataset and train settings for the training tests."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = (
    "CT of the chest, axial slice, lung window",
    "CT of the chest, axial slice, mediastinum window",
    "MR of the brain, axial slice, female",
    "radiograph of the chest, PA view, male",
)


def phantom(index: int, size: int) -> np.ndarray:
    """A smooth 8-bit disc phantom whose radius and brightness depend on `index`."""
    y, x = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    radius = 0.25 + 0.04 * (index % 4)
    image = np.where(x**2 + y**2 < radius**2, 0.5 + 0.1 * (index % 3), 0.05)
    image = image + 0.2 * np.exp(-((x - 0.1) ** 2 + (y + 0.05) ** 2) / 0.01)
    return np.clip(image * 255, 0, 255).astype(np.uint8)


def write_split(root: Path, split: str, count: int, size: int = 64, offset: int = 0) -> Path:
    """Write `count` grayscale PNGs and metadata.jsonl into root/split; returns the folder."""
    folder = root / split
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / "metadata.jsonl").open("w", encoding="utf-8") as handle:
        for i in range(count):
            name = f"img_{offset + i:03d}.png"
            Image.fromarray(phantom(offset + i, size), mode="L").save(folder / name)
            record = {
                "file_name": name,
                "text": CAPTIONS[(offset + i) % len(CAPTIONS)],
                "pixel_source": "synthetic",
            }
            handle.write(json.dumps(record) + "\n")
    return folder


def write_dataset(root: Path, train: int = 12, val: int = 4, size: int = 64) -> Path:
    """A train/val imagefolder dataset under root."""
    write_split(root, "train", train, size)
    write_split(root, "val", val, size, offset=100)
    return root


def settings(**overrides) -> dict:
    """The train section with defaults filled, small enough for the tests."""
    base = {
        "base_model": "tiny",
        "revision": None,
        "tiny_seed": 0,
        "seed": 42,
        "max_steps": 4,
        "train_batch_size": 4,
        "gradient_accumulation_steps": 1,
        "learning_rate": 1.0e-3,
        "lr_scheduler": "constant_with_warmup",
        "lr_warmup_steps": 2,
        "adam_beta1": 0.9,
        "adam_beta2": 0.999,
        "adam_weight_decay": 1.0e-2,
        "adam_epsilon": 1.0e-8,
        "max_grad_norm": 1.0,
        "mixed_precision": "no",
        "checkpointing_steps": 100,
        "checkpoints_total_limit": 2,
        "resume": "auto",
        "heldout_split": "val",
        "heldout_max_images": 64,
        "dataloader_workers": 0,
    }
    base.update(overrides)
    return base


@contextlib.contextmanager
def own_precision() -> Iterator[None]:
    """Within the block train() may pick another mixed precision: accelerate's
    process-wide state (which refuses a change) is forgotten on entry and on exit."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
