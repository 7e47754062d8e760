"""Intensity fidelity: histogram distances with known values, grouping by modality/window."""

from __future__ import annotations

import numpy as np
import pytest

from idc_diffusion.evaluate.intensity import (
    gray_histogram,
    group_key,
    intensity_fidelity,
    jensen_shannon,
    wasserstein_1,
)


def _const(level: int, side: int = 8) -> np.ndarray:
    return np.full((side, side), level, np.uint8)


def test_histogram_counts() -> None:
    image = np.array([[0, 0, 255], [7, 7, 7]], np.uint8)
    hist = gray_histogram(image)
    assert hist.shape == (256,) and hist.sum() == 6
    assert (hist[0], hist[7], hist[255]) == (2, 3, 1)
    with pytest.raises(TypeError, match="uint8"):
        gray_histogram(image.astype(np.float32))


def test_distances_known_values() -> None:
    black, white, mid = (gray_histogram(_const(v)) for v in (0, 255, 51))
    assert wasserstein_1(black, black) == 0.0 and jensen_shannon(black, black) == 0.0
    assert wasserstein_1(black, white) == pytest.approx(1.0)
    assert wasserstein_1(black, mid) == pytest.approx(51 / 255)
    assert jensen_shannon(black, white) == pytest.approx(1.0)  # disjoint supports
    half = gray_histogram(np.concatenate([_const(0), _const(255)]))
    assert wasserstein_1(black, half) == pytest.approx(0.5)
    assert jensen_shannon(black, half) == pytest.approx(1.5 - 0.75 * np.log2(3), abs=1e-12)


def test_group_key() -> None:
    assert group_key({"modality": "CT", "window": "lung"}) == "CT / lung"
    assert group_key({"modality": "MR", "window": None}) == "MR / —"
    assert group_key(None) is None


def test_intensity_fidelity_groups_and_unmatched() -> None:
    real = [gray_histogram(_const(v)) for v in (10, 10, 200)]
    fake = [gray_histogram(_const(v)) for v in (10, 100, 0)]
    out = intensity_fidelity(
        real, ["CT / lung", "CT / lung", "MR / —"], fake, ["CT / lung", "CT / bone", None]
    )
    assert out["unmatched_generated"] == 1
    groups = {g["group"]: g for g in out["groups"]}
    assert set(groups) == {"CT / bone", "CT / lung", "MR / —"}
    lung = groups["CT / lung"]
    assert (lung["n_real"], lung["n_generated"]) == (2, 1)
    assert lung["wasserstein_1"] == 0.0 and lung["jensen_shannon"] == 0.0
    assert sum(lung["real_histogram"]) == 128
    assert groups["CT / bone"]["wasserstein_1"] is None
    assert groups["MR / —"]["n_generated"] == 0
