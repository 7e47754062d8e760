"""Intensity transforms from stored DICOM values to 8-bit display values (pure numpy).

The chain for one image is: stored values -> modality LUT (RescaleSlope/Intercept, giving
HU for CT) -> VOI window or percentile normalisation -> uint8 0..255 -> inversion for
MONOCHROME1 (so that high attenuation, e.g. bone, is bright in every output).

pydicom's ``apply_voi_lut``/``apply_windowing`` return floats in the *input* range rather
than 0..255, so the 8-bit mapping is implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

UINT8_MAX = 255.0


def apply_modality_lut(
    stored: np.ndarray, slope: float = 1.0, intercept: float = 0.0
) -> np.ndarray:
    """Return ``stored * slope + intercept`` as float32 (DICOM PS3.3 C.11.1, linear case)."""
    return np.asarray(stored, dtype=np.float32) * np.float32(slope) + np.float32(intercept)


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Map values through the DICOM linear VOI window to uint8 0..255.

    DICOM PS3.3 C.11.2.1.2.1 ("LINEAR") with output range 0..255, c = center, w = width::

        x <= c - 0.5 - (w - 1) / 2   ->   0
        x >  c - 0.5 + (w - 1) / 2   ->   255
        otherwise                    ->   round(((x - (c - 0.5)) / (w - 1) + 0.5) * 255)

    Rounding is to the nearest integer (halves to even). Example, lung window c=-600, w=1500:
    -1350 -> 0, -600 -> 128 (127.59 rounded), 150 -> 255.
    """
    if not width >= 1:
        raise ValueError(f"window width must be >= 1, got {width}")
    x = np.asarray(values, dtype=np.float64)
    scaled = ((x - (center - 0.5)) / (width - 1) + 0.5) * UINT8_MAX
    lower = center - 0.5 - (width - 1) / 2
    upper = center - 0.5 + (width - 1) / 2
    out = np.where(x <= lower, 0.0, np.where(x > upper, UINT8_MAX, scaled))
    return np.clip(np.rint(out), 0, UINT8_MAX).astype(np.uint8)


def percentile_range(values: np.ndarray, low_pct: float, high_pct: float) -> tuple[float, float]:
    """Robust intensity range of a whole volume: its (low_pct, high_pct) percentiles."""
    if not 0 <= low_pct < high_pct <= 100:
        raise ValueError(f"need 0 <= low < high <= 100 percentiles, got {low_pct}, {high_pct}")
    finite = np.asarray(values, dtype=np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return 0.0, 0.0
    lo, hi = np.percentile(finite, [low_pct, high_pct])
    return float(lo), float(hi)


def normalise_to_uint8(values: np.ndarray, low: float, high: float) -> np.ndarray:
    """Linearly map [low, high] to 0..255 (clipped, rounded); a flat range maps to 0."""
    x = np.asarray(values, dtype=np.float64)
    if not high > low:
        return np.zeros(x.shape, dtype=np.uint8)
    out = (x - low) / (high - low) * UINT8_MAX
    return np.clip(np.rint(np.nan_to_num(out)), 0, UINT8_MAX).astype(np.uint8)


def first_value(value: Any) -> float | None:
    """First number of a possibly multi-valued DICOM DS/IS value, or None if absent/invalid."""
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split("\\")[0]
    elif isinstance(value, (Sequence, np.ndarray)):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def voi_window(center: Any, width: Any) -> tuple[float, float] | None:
    """The file's VOI window (first value of WindowCenter/WindowWidth), None if unusable."""
    c, w = first_value(center), first_value(width)
    if c is None or w is None or w < 1:
        return None
    return c, w


def invert_if_monochrome1(image: np.ndarray, photometric: str | None) -> np.ndarray:
    """Invert a uint8 image when PhotometricInterpretation is MONOCHROME1 (low = white)."""
    if (photometric or "").strip().upper() == "MONOCHROME1":
        return (np.uint8(255) - np.asarray(image, dtype=np.uint8)).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)
