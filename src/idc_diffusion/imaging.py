"""2-D image helpers: square resize with padding, PNG writing, foreground fraction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """Fit a uint8 image into a `size` x `size` square, keeping aspect ratio, padding with 0.

    The longer side becomes `size` (Lanczos resampling); the image is centred. An image that
    already is `size` x `size` is returned unchanged (no resampling).
    """
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D image, got shape {image.shape}")
    rows, cols = image.shape
    if (rows, cols) == (size, size):
        return image.copy()
    scale = size / max(rows, cols)
    new_rows = max(1, min(size, round(rows * scale)))
    new_cols = max(1, min(size, round(cols * scale)))
    resized = Image.fromarray(image).resize((new_cols, new_rows), Image.Resampling.LANCZOS)
    out = np.zeros((size, size), dtype=np.uint8)
    top, left = (size - new_rows) // 2, (size - new_cols) // 2
    out[top : top + new_rows, left : left + new_cols] = np.asarray(resized)
    return out


def write_png(image: np.ndarray, path: Path) -> Path:
    """Write a 2-D uint8 array as an 8-bit greyscale PNG (no metadata)."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 2:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG")
    return path


def foreground_fraction(values: np.ndarray, threshold: float) -> float:
    """Fraction of pixels strictly above `threshold` (e.g. -500 HU for CT body)."""
    values = np.asarray(values)
    return float(np.mean(values > threshold)) if values.size else 0.0
