"""Which slices of a sorted stack become images, each with the slices that replace it when
it fails to decode (``prepare.slice_selection``: ``band``, ``uniform`` or ``positions``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from idc_diffusion.prepare.geometry import axis_fractions
from idc_diffusion.prepare.series import SeriesScan


def select_indices(n: int, k: int, band: Sequence[float] = (0.0, 1.0)) -> list[int]:
    """k slice indices of an n-slice stack at the centres of k equal sub-bands of `band`."""
    return sorted(band_candidates(n, k, band))


def band_candidates(n: int, k: int, band: Sequence[float] = (0.0, 1.0)) -> dict[int, list[int]]:
    """The slice at the centre of each of k equal sub-bands of `band` (n-slice stack), with
    the other slices of its sub-band nearest first: what replaces it if it fails to decode."""
    if n <= 0:
        return {}
    lo, hi = band
    edges = (lo + (hi - lo) * np.arange(k + 1) / k) * (n - 1)
    centres = (lo + (hi - lo) * (np.arange(k) + 0.5) / k) * (n - 1)
    out: dict[int, list[int]] = {}
    for j, centre in enumerate(centres):
        first = int(np.clip(np.rint(centre), 0, n - 1))
        inside = range(max(0, int(np.ceil(edges[j]))), min(n - 1, int(np.floor(edges[j + 1]))) + 1)
        rest = sorted((i for i in inside if i != first), key=lambda i: (abs(i - centre), i))
        out.setdefault(first, rest)
    return out


def nearest_candidates(fractions: np.ndarray, wanted: Sequence[float]) -> dict[int, list[int]]:
    """The slice nearest to each wanted fraction, with the slices nearer to that fraction
    than to any other wanted one, nearest first."""
    wanted = np.asarray(wanted, dtype=float)
    owner = np.argmin(np.abs(fractions[:, None] - wanted[None, :]), axis=1)
    out: dict[int, list[int]] = {}
    for w, target in enumerate(wanted):
        mine = sorted(np.flatnonzero(owner == w), key=lambda i: (abs(fractions[i] - target), i))
        first = int(np.argmin(np.abs(fractions - target)))
        out.setdefault(first, [int(i) for i in mine if i != first])
    return out


def choose_slices(
    scan: SeriesScan, projection: bool, settings: Mapping[str, Any]
) -> dict[int, list[int]]:
    """Sorted-stack indices of the slices to render, each with its replacements in order
    (see :mod:`idc_diffusion.prepare.shard`, step 2)."""
    n, k = len(scan.slices), int(settings["slices_per_series"])
    mode = settings.get("slice_selection", "band")
    if projection or mode == "uniform":
        return band_candidates(n, k)
    if mode == "positions":
        fractions = axis_fractions(scan.positions_mm)
        if np.all(np.isfinite(fractions)):
            return nearest_candidates(fractions, settings.get("slice_positions") or [0.5])
        return band_candidates(n, k)  # no extent along the normal: fall back to uniform
    if mode != "band":
        raise ValueError(f"prepare.slice_selection: unknown mode {mode!r}")
    return band_candidates(n, k, settings["slice_band"])
