"""The memorization audit: planted copies are flagged, held-out images only at the null's rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eval_fixtures import blob_tensor, noise_tensor

from idc_diffusion.evaluate.memorization import audit, calibrate, nearest_train, shown_pairs


@pytest.fixture(scope="module")
def train() -> torch.Tensor:
    return blob_tensor(300, seed=1)


def _shift_padded(image: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``image`` moved by (dy, dx) px, the uncovered border filled with the edge rows (no wrap)."""
    pad = (abs(dx), abs(dx), abs(dy), abs(dy))
    padded = torch.nn.functional.pad(image.float(), pad, mode="replicate")
    h, w = image.shape[-2:]
    top, left = abs(dy) - dy, abs(dx) - dx
    return padded[..., top : top + h, left : left + w].to(torch.uint8)


def _noised(image: torch.Tensor, sigma: float, seed: int) -> torch.Tensor:
    noise = torch.randn(image.shape, generator=torch.Generator().manual_seed(seed)) * sigma
    return (image.float() + noise).clamp(0, 255).round().to(torch.uint8)


def test_shift_helper_moves_content() -> None:
    image = torch.zeros(1, 1, 8, 8, dtype=torch.uint8)
    image[..., 3, 4] = 255
    moved = _shift_padded(image, 2, -1)
    assert moved[0, 0, 5, 3] == 255 and moved.sum() == 255


def test_planted_copies_are_flagged_and_heldout_images_are_not(train) -> None:
    heldout = blob_tensor(200, seed=2)  # the null: same distribution, no copies
    fresh = blob_tensor(200, seed=3)  # more held-out images submitted as samples
    copies = torch.cat(
        [
            train[[10]],  # exact
            _shift_padded(train[[20]], 1, 0),
            _shift_padded(train[[30]], -2, 1),
            torch.roll(train[[40]], (2, 2), dims=(2, 3)),
            _noised(train[[50]], 8.0, seed=0),  # ~3% of the range
            _noised(_shift_padded(train[[60]], 0, -1), 5.0, seed=1),
        ]
    )
    samples = torch.cat([copies, fresh])
    table, summary = audit(samples, heldout, train, quantile=0.95, max_shift=2)
    assert summary["threshold"] == calibrate(np.array(summary["null_similarity"]), 0.95)
    assert summary["n_null"] == 200 and summary["n_samples"] == 206
    head = table.iloc[:6]
    assert head["flagged"].all()
    assert head["nearest_train"].tolist() == [10, 20, 30, 40, 50, 60]
    assert head["similarity"].iloc[0] == pytest.approx(1.0, abs=1e-5)
    shifts = list(zip(head["shift_y"], head["shift_x"], strict=True))
    assert shifts[:4] == [(0, 0), (1, 0), (-2, 1), (2, 2)] and shifts[5] == (0, -1)
    # held-out images: flagged at about 1 - quantile = 0.05 (sd ~0.02 here: 200 images, and
    # the threshold's own error from a 200-image null); measured 0.09
    assert table.iloc[6:]["flagged"].mean() <= 0.12
    assert summary["n_flagged"] == 6 + int(table.iloc[6:]["flagged"].sum())


def test_unrelated_images_score_low(train) -> None:
    table = nearest_train(noise_tensor(4, seed=8), train)
    assert (table["similarity"] < 0.3).all() and not table["flagged"].any()


def test_calibration_quantile_and_small_null() -> None:
    null = np.array([0.5, 0.6, 0.7, 0.8])
    assert calibrate(null, 0.5) == 0.7  # next observed value up, no interpolation
    assert calibrate(null, 0.99) == 0.8  # a small null: its maximum
    with pytest.raises(ValueError, match="no held-out images"):
        calibrate(np.array([]), 0.99)


def test_shown_pairs_prefers_flagged(train) -> None:
    samples = torch.cat([train[[5]], blob_tensor(5, seed=4)])
    table, summary = audit(samples, blob_tensor(30, seed=5), train, quantile=0.99)
    assert summary["expected_heldout_flag_rate"] == pytest.approx(1 / 31)
    flagged = table[table["flagged"]]
    assert shown_pairs(table, 3)["sample_index"].tolist() == flagged["sample_index"].tolist()[:3]
    none_flagged = table.assign(flagged=False)
    assert len(shown_pairs(none_flagged, 3)) == 3


def test_empty_inputs() -> None:
    empty = torch.zeros(0, 1, 64, 64, dtype=torch.uint8)
    assert nearest_train(blob_tensor(2, seed=9), empty).empty
    assert nearest_train(empty, blob_tensor(2, seed=9)).empty
