"""Intensity fidelity: pixel-value histograms of real vs generated images per modality/window.

Windowed 8-bit images of one modality and window preset have a characteristic grey-level
distribution (air, fat, soft tissue, bone at fixed grey levels in CT). A generated image is
compared with real test images of the caption its prompt matches: the structured fields of
that caption (metadata.jsonl) give its modality and window.

Distances between normalised 256-bin histograms: Wasserstein-1 (earth mover's distance, in
fractions of the full 0-255 range, so 0…1) and Jensen-Shannon divergence (base 2, 0…1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BINS = 256
GROUP_FIELDS = ("modality", "window")


def gray_histogram(gray: np.ndarray) -> np.ndarray:
    """Counts of each uint8 grey level (256 int64 values)."""
    if gray.dtype != np.uint8:
        raise TypeError(f"expected a uint8 image, got {gray.dtype}")
    return np.bincount(gray.ravel(), minlength=BINS).astype(np.int64)


def _normalise(hist: np.ndarray) -> np.ndarray:
    total = float(hist.sum())
    if total <= 0:
        raise ValueError("empty histogram")
    return hist.astype(np.float64) / total


def wasserstein_1(a: np.ndarray, b: np.ndarray) -> float:
    """Earth mover's distance between two histograms over 0…255, as a fraction of 255."""
    cdf_a, cdf_b = np.cumsum(_normalise(a)), np.cumsum(_normalise(b))
    return float(np.abs(cdf_a - cdf_b)[:-1].sum() / (BINS - 1))


def jensen_shannon(a: np.ndarray, b: np.ndarray) -> float:
    """Jensen-Shannon divergence (base 2) between two histograms."""
    p, q = _normalise(a), _normalise(b)
    m = (p + q) / 2

    def _kl(x: np.ndarray) -> float:
        mask = x > 0
        return float((x[mask] * np.log2(x[mask] / m[mask])).sum())

    return max(0.5 * _kl(p) + 0.5 * _kl(q), 0.0)


def group_key(fields: Mapping[str, Any] | None, names: Sequence[str] = GROUP_FIELDS) -> str | None:
    """``"CT / lung"`` from the fields (missing ones as ``—``); None without fields."""
    if fields is None:
        return None
    return " / ".join(str(fields.get(n)) if fields.get(n) is not None else "—" for n in names)


def intensity_fidelity(
    real_hists: Sequence[np.ndarray],
    real_keys: Sequence[str | None],
    fake_hists: Sequence[np.ndarray],
    fake_keys: Sequence[str | None],
) -> dict[str, Any]:
    """Per group (e.g. ``"CT / lung"``): summed histograms of both sides and their distances.

    Groups present on only one side are listed with ``None`` distances. Generated images
    whose prompt matched no real caption (key None) are counted as ``unmatched``.
    """
    sums: dict[str, dict[str, Any]] = {}
    for side, hists, keys in (
        ("real", real_hists, real_keys),
        ("generated", fake_hists, fake_keys),
    ):
        for hist, key in zip(hists, keys, strict=True):
            if key is None:
                continue
            entry = sums.setdefault(
                key,
                {
                    "real": np.zeros(BINS, np.int64),
                    "n_real": 0,
                    "generated": np.zeros(BINS, np.int64),
                    "n_generated": 0,
                },
            )
            entry[side] = entry[side] + hist
            entry[f"n_{side}"] += 1
    groups = []
    for key in sorted(sums):
        entry = sums[key]
        both = entry["n_real"] and entry["n_generated"]
        groups.append(
            {
                "group": key,
                "n_real": entry["n_real"],
                "n_generated": entry["n_generated"],
                "wasserstein_1": wasserstein_1(entry["real"], entry["generated"]) if both else None,
                "jensen_shannon": jensen_shannon(entry["real"], entry["generated"])
                if both
                else None,
                "real_histogram": entry["real"].tolist(),
                "generated_histogram": entry["generated"].tolist(),
            }
        )
    return {
        "grouped_by": list(GROUP_FIELDS),
        "bins": BINS,
        "groups": groups,
        "unmatched_generated": sum(1 for k in fake_keys if k is None),
    }
