"""Intensity transforms from stored DICOM values to 8-bit display values (pure numpy).

The chain for one image is: stored values -> modality LUT (RescaleSlope/Intercept, giving
HU for CT) -> VOI window or percentile normalisation -> uint8 0..255 -> inversion for
MONOCHROME1 (so that high attenuation, e.g. bone, is bright in every output).

pydicom's ``apply_voi_lut``/``apply_windowing`` return floats in the *input* range rather
than 0..255, so the 8-bit mapping is implemented here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
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
    """Invert a uint8 image (any shape) when PhotometricInterpretation is MONOCHROME1."""
    if (photometric or "").strip().upper() == "MONOCHROME1":
        return (np.uint8(255) - np.asarray(image, dtype=np.uint8)).astype(np.uint8)
    return np.asarray(image, dtype=np.uint8)


@dataclass(frozen=True, eq=False)
class Lut:
    """A DICOM lookup table: LUT Descriptor (entries, first mapped value, bits) plus data."""

    first_mapped: int
    data: np.ndarray  # output value of each entry, in table order
    bits: int

    def __post_init__(self) -> None:
        if self.data.ndim != 1 or self.data.size == 0:
            raise ValueError("LUT data must be a non-empty 1-D array")


def lut_from_item(item: Any, signed_input: bool = False) -> Lut:
    """A :class:`Lut` from a Modality/VOI LUT Sequence item (ValueError when malformed).

    Descriptor value 0 for the entry count means 65536 (PS3.3 C.11.1.1.1); the first mapped
    value is read as signed when the pixel data is signed. 8-bit tables stored as OW carry
    one entry per byte when their byte count equals the entry count.
    """
    descriptor = [int(v) for v in item.LUTDescriptor]
    if len(descriptor) != 3:
        raise ValueError(f"LUTDescriptor needs 3 values, got {descriptor}")
    entries, first, bits = descriptor
    entries = entries or 65536
    if signed_input and first >= 2**15:
        first -= 2**16
    raw = item.LUTData
    if isinstance(raw, bytes):
        dtype = "u1" if bits <= 8 and len(raw) == entries else "<u2"
        data = np.frombuffer(raw, dtype=dtype)
    else:
        data = np.atleast_1d(np.asarray(raw, dtype=np.float64))
    if data.size < entries:
        raise ValueError(f"LUTData has {data.size} entries, LUTDescriptor says {entries}")
    return Lut(first, np.asarray(data[:entries], dtype=np.float64), bits)


def apply_lut(values: np.ndarray, lut: Lut) -> np.ndarray:
    """Look `values` up in `lut` (below/above its range: first/last entry), as float32."""
    index = np.rint(np.asarray(values, dtype=np.float64)) - lut.first_mapped
    index = np.clip(index, 0, lut.data.size - 1).astype(np.intp)
    return lut.data[index].astype(np.float32)


def lut_to_uint8(values: np.ndarray, lut: Lut) -> np.ndarray:
    """A VOI LUT's output scaled from its range 0..2**bits-1 to uint8 0..255 (rounded)."""
    top = float(2**lut.bits - 1)
    out = apply_lut(values, lut).astype(np.float64) / top * UINT8_MAX
    return np.clip(np.rint(out), 0, UINT8_MAX).astype(np.uint8)


def all_values(value: Any) -> list[float]:
    """Every number of a possibly multi-valued DICOM DS/IS value (invalid entries skipped)."""
    if value is None:
        return []
    if isinstance(value, str):
        items: list[Any] = value.split("\\")
    elif isinstance(value, (Sequence, np.ndarray)):
        items = list(value)
    else:
        items = [value]
    numbers = [first_value(v) for v in items]
    return [n for n in numbers if n is not None]


def voi_windows(center: Any, width: Any) -> list[tuple[float, float]]:
    """All usable (center, width) pairs of WindowCenter/WindowWidth (width >= 1)."""
    pairs = zip(all_values(center), all_values(width), strict=False)
    return [(c, w) for c, w in pairs if w >= 1]


def pick(options: Sequence[Any], index: int) -> tuple[int, Any] | None:
    """The option at `index` (the last one when there are fewer), with the index used."""
    if not options:
        return None
    used = min(max(index, 0), len(options) - 1)
    return used, options[used]


def composite_to_uint8(values: np.ndarray, windows: Sequence[tuple[float, float]]) -> np.ndarray:
    """One channel per linear window (e.g. lung, mediastinum, bone): uint8 [rows, cols, 3]."""
    if len(windows) != 3:
        raise ValueError(f"an RGB composite needs exactly 3 windows, got {len(windows)}")
    return np.stack([window_to_uint8(values, c, w) for c, w in windows], axis=-1)
