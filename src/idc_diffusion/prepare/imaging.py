"""2-D image helpers: square resize with padding, PNG writing, foreground fraction."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from idc_diffusion.prepare.geometry import fit_square


def resize_square(
    image: np.ndarray, size: int, spacing: Sequence[float] | None = None
) -> np.ndarray:
    """Fit a uint8 image (greyscale or RGB) into a `size` x `size` square, padding with 0.

    The longer physical side becomes `size` (Lanczos resampling); with `spacing` (row, column
    PixelSpacing) non-square pixels are stretched to their true aspect ratio, without it
    pixels are taken as square. The image is centred. A square-pixel image that already is
    `size` x `size` is returned unchanged (no resampling).
    """
    image = np.asarray(image, dtype=np.uint8)
    if image.ndim != 2 and not (image.ndim == 3 and image.shape[2] == 3):
        raise ValueError(f"expected a 2-D or RGB image, got shape {image.shape}")
    return fit_square(image, size, spacing)


# zlib level 1: the same pixels as PIL's default level 6, files ~13% larger, and about 2×
# less CPU for the whole prepare stage, where PNG encoding is three quarters of the work
# (bench/bench_prepare.py).
PNG_COMPRESS_LEVEL = 1


def write_png(image: np.ndarray, path: Path) -> Path:
    """Write a uint8 array as an 8-bit greyscale (2-D) or RGB ([H, W, 3]) PNG, no metadata."""
    image = np.asarray(image)
    rgb = image.ndim == 3 and image.shape[2] == 3
    if image.dtype != np.uint8 or not (image.ndim == 2 or rgb):
        raise ValueError(f"expected a 2-D or RGB uint8 image, got {image.dtype} {image.shape}")
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return path


def foreground_fraction(values: np.ndarray, threshold: float) -> float:
    """Fraction of pixels strictly above `threshold` (e.g. -500 HU for CT body)."""
    values = np.asarray(values)
    return float(np.mean(values > threshold)) if values.size else 0.0
