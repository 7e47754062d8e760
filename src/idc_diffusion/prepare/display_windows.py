"""The display windows a slice's images are made with (CT presets, a file's own VOI window or
LUT, the series' percentiles) and the rendering of values through them to 8 bits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from idc_diffusion.prepare.series import SeriesScan, SliceHeader, load_slices
from idc_diffusion.prepare.slice_selection import select_indices
from idc_diffusion.prepare.windowing import (
    Lut,
    composite_to_uint8,
    invert_if_monochrome1,
    lut_to_uint8,
    normalise_to_uint8,
    percentile_range,
    pick,
    window_to_uint8,
)

STATS_MAX_SLICES = 32


@dataclass(frozen=True)
class Window:
    """How one output image of a slice is made from its values."""

    name: str  # record's window name: a CT preset, "voi" or "percentile"
    center: float | None  # linear window (CT preset or VOI); None for percentile
    width: float | None
    low: float | None = None  # percentile range; None for linear windows
    high: float | None = None
    caption: str | None = None  # caption's {window} field; only CT presets have one
    lut: Lut | None = None  # VOI LUT Sequence item ("voi_lut")
    composite: tuple[tuple[float, float], ...] | None = None  # RGB channels' windows
    voi_index: int | None = None  # which of the file's VOI windows/LUTs was used


def ct_windows(body_part: str | None, settings: Mapping[str, Any]) -> list[Window]:
    """The CT presets configured for a body part (``default`` for any other)."""
    table = settings["ct_windows"]
    names = table.get((body_part or "").strip().upper(), table["default"])
    presets = settings["window_presets"]
    composite = settings.get("ct_composite")
    if composite:
        channels = tuple(
            (float(presets[n]["center"]), float(presets[n]["width"])) for n in composite
        )
        label = "/".join(composite) + " composite"
        return [Window("composite", None, None, caption=label, composite=channels)]
    return [
        Window(name, float(presets[name]["center"]), float(presets[name]["width"]), caption=name)
        for name in names
    ]


def percentile_window(values: np.ndarray, percentiles: Sequence[float]) -> Window:
    """A 'percentile' window spanning the given percentiles of `values`."""
    low, high = percentile_range(values, *percentiles)
    return Window("percentile", None, None, low=low, high=high)


def render(values: np.ndarray, window: Window, photometric: str) -> np.ndarray:
    """One slice's values through a window to display uint8 (MONOCHROME1 inverted)."""
    if window.composite is not None:
        image = composite_to_uint8(values, window.composite)
    elif window.lut is not None:
        image = lut_to_uint8(values, window.lut)
    elif window.center is not None and window.width is not None:
        image = window_to_uint8(values, window.center, window.width)
    else:
        image = normalise_to_uint8(values, window.low or 0.0, window.high or 0.0)
    return invert_if_monochrome1(image, photometric)


def _stats_indices(n: int) -> list[int]:
    """Up to STATS_MAX_SLICES evenly spaced slices of an n-slice stack (window statistics)."""
    return select_indices(n, min(n, STATS_MAX_SLICES))


def voi_window(header: SliceHeader, settings: Mapping[str, Any]) -> Window | None:
    """A file's own display window: its VOI LUT Sequence item, else its WindowCenter/Width
    (number ``voi_index``, the last when there are fewer); None when it has neither."""
    index = int(settings.get("voi_index", 0))
    lut = pick(header.voi_luts, index)
    if lut is not None:
        return Window("voi_lut", None, None, lut=lut[1], voi_index=lut[0])
    voi = pick(header.windows, index)
    if voi is not None:
        return Window("voi", voi[1][0], voi[1][1], voi_index=voi[0])
    return None


def series_windows(
    modality: str, body_part: str | None, scan: SeriesScan, settings: Mapping[str, Any]
) -> list[Window]:
    """The windows of a series' slices that are not shown with their own VOI window: the
    CT presets, else percentiles of the volume (see :mod:`idc_diffusion.prepare.shard`, step 3)."""
    if modality == "CT":
        return ct_windows(body_part, settings)
    stats = load_slices(scan, _stats_indices(len(scan.slices))).volume
    return [percentile_window(stats, settings["mr_percentiles"])]
