"""Patient geometry of image planes and in-plane resampling (pure functions).

DICOM patient coordinates are LPS: x to the patient's left, y posterior, z superior (head).
A slice's normal is row cosines x column cosines; stacks are sorted by the dot product of
ImagePositionPatient with that normal, which handles oblique and reversed stacks alike.

Resampling to a field of view: with PixelSpacing (row spacing, column spacing) in mm, an
image is scaled so that `size` output pixels span `fov_mm`, i.e. every output pixel is
``fov_mm / size`` mm on each side whatever the scanner's matrix, then centre-cropped or
zero-padded to `size` x `size`. Nothing is ever flipped: laterality is kept.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

OBLIQUE_COSINE = 0.8  # |normal component| below this on every axis -> "oblique"
THIRDS = ("lower", "middle", "upper")


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """Unit normal of an image plane: row cosines x column cosines."""
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    norm = np.linalg.norm(normal)
    if norm == 0:
        raise ValueError(f"degenerate ImageOrientationPatient {orientation}")
    return normal / norm


def plane_name(orientation: Sequence[float] | None) -> str | None:
    """axial / coronal / sagittal from the dominant normal axis (LPS), else oblique."""
    if orientation is None:
        return None
    normal = np.abs(slice_normal(orientation))
    axis = int(np.argmax(normal))
    if normal[axis] < OBLIQUE_COSINE:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


def is_localizer(image_type: Sequence[str] | None) -> bool:
    """True for localizer/scout images (ImageType or FrameType value LOCALIZER)."""
    return any(str(v).strip().upper() == "LOCALIZER" for v in image_type or ())


def axis_fractions(z_mm: np.ndarray) -> np.ndarray:
    """Where each slice lies along the body axis: 0 = most inferior, 1 = most superior.

    NaN for all slices when the stack has no z extent (or no geometry).
    """
    z = np.asarray(z_mm, dtype=np.float64)
    if z.size == 0 or not np.all(np.isfinite(z)):
        return np.full(z.shape, np.nan)
    lo, hi = float(z.min()), float(z.max())
    if hi - lo <= 0:
        return np.full(z.shape, np.nan)
    return (z - lo) / (hi - lo)


def third_of(fraction: float) -> str | None:
    """'lower', 'middle' or 'upper' third of the scanned range (None for NaN)."""
    if not np.isfinite(fraction):
        return None
    return THIRDS[min(int(fraction * 3), 2)]


def center_crop(image: np.ndarray, fraction: float) -> np.ndarray:
    """The central `fraction` (0 < fraction <= 1) of each in-plane side of an image."""
    if not 0 < fraction <= 1:
        raise ValueError(f"center_crop must be in (0, 1], got {fraction}")
    rows, cols = image.shape[:2]
    keep_r, keep_c = max(1, round(rows * fraction)), max(1, round(cols * fraction))
    top, left = (rows - keep_r) // 2, (cols - keep_c) // 2
    return image[top : top + keep_r, left : left + keep_c].copy()


def pad_or_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Centre `image` on a `size` x `size` zero canvas, cropping what sticks out."""
    rows, cols = image.shape[:2]
    out = np.zeros((size, size, *image.shape[2:]), dtype=image.dtype)
    src_r, dst_r = max(0, (rows - size) // 2), max(0, (size - rows) // 2)
    src_c, dst_c = max(0, (cols - size) // 2), max(0, (size - cols) // 2)
    n_r, n_c = min(rows, size), min(cols, size)
    out[dst_r : dst_r + n_r, dst_c : dst_c + n_c] = image[src_r : src_r + n_r, src_c : src_c + n_c]
    return out


def fov_shape(
    shape: tuple[int, int], spacing: Sequence[float], fov_mm: float, size: int
) -> tuple[int, int]:
    """Rows, cols an image of `shape` and `spacing` (mm) has at fov_mm / size mm per pixel."""
    pixel_mm = fov_mm / size
    return (
        max(1, round(shape[0] * float(spacing[0]) / pixel_mm)),
        max(1, round(shape[1] * float(spacing[1]) / pixel_mm)),
    )


def _resize(image: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Lanczos resize of a uint8 greyscale or RGB image (unchanged when already that size)."""
    if image.shape[:2] == (rows, cols):
        return image.copy()
    return np.asarray(Image.fromarray(image).resize((cols, rows), Image.Resampling.LANCZOS))


def resample_to_fov(
    image: np.ndarray, spacing: Sequence[float], fov_mm: float, size: int
) -> np.ndarray:
    """Scale a uint8 image to fov_mm / size mm per pixel, then centre it on size x size."""
    if fov_mm <= 0 or size <= 0:
        raise ValueError(f"field of view and size must be positive, got {fov_mm}, {size}")
    rows, cols = fov_shape(image.shape[:2], spacing, fov_mm, size)
    return pad_or_crop(_resize(np.asarray(image, np.uint8), rows, cols), size)


def fit_square(image: np.ndarray, size: int, spacing: Sequence[float] | None = None) -> np.ndarray:
    """Fit a uint8 image into size x size keeping its physical aspect ratio (longer side =
    size), padded. `spacing` (row, column mm) makes non-square pixels square; None: square."""
    rows, cols = image.shape[:2]
    if spacing is not None and float(spacing[0]) != float(spacing[1]):
        rows = rows * float(spacing[0]) / float(spacing[1])  # in column-pixel units
    scale = size / max(rows, cols)
    new_rows = max(1, min(size, round(rows * scale)))
    new_cols = max(1, min(size, round(cols * scale)))
    return pad_or_crop(_resize(np.asarray(image, np.uint8), new_rows, new_cols), size)
