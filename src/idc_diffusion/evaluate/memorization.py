"""Memorization audit: flag generated samples that are copies of a training image, and only those.

Similarity of two images is the highest Pearson correlation (zero-mean normalised
cross-correlation) of their grayscale ``size`` px copies over integer shifts of up to
``max_shift`` pixels in each direction: the central ``size - 2·max_shift`` square of one image
against every equally sized window of the other. A copy scores 1 whether or not it is shifted;
mild noise lowers it only slightly.

The threshold is calibrated on the data (:func:`calibrate`): the held-out test images are not
copies of training images by construction (patient-level splits), so the similarity of each
test image to its nearest training image is the null distribution; a sample is flagged when its
own nearest-training similarity exceeds the ``quantile`` of that null. A held-out image is then
flagged with probability about ``1 - quantile`` (at least ``1 / (n_null + 1)``).

To scale to tens of thousands of training images, :func:`nearest_train` pre-selects the
``candidates`` most similar training images with the same shift-tolerant similarity at 16 px
(±1 px), then scores those exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor

from idc_diffusion.evaluate.metrics import to_gray_float

AUDIT_SIZE = 64  # side of the grayscale copies the audit compares
PRESELECT_SIZE = 16
COLUMNS = {
    "sample_index": "int64",
    "nearest_train": "int64",
    "similarity": "float64",
    "shift_y": "int64",
    "shift_x": "int64",
    "flagged": "bool",
}


def gray_copies(images: Tensor, size: int) -> Tensor:
    """uint8 ``[N, C, H, W]`` → float32 grayscale ``[N, size, size]`` (antialiased bilinear)."""
    gray = to_gray_float(images)
    if gray.shape[-2:] != (size, size):
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", antialias=True)
    return gray[:, 0]


def _standardise(x: Tensor) -> Tensor:
    """Rows of ``[..., L]`` made zero-mean and unit-norm (flat rows stay 0)."""
    x = x - x.mean(dim=-1, keepdim=True)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def shifted_windows(images: Tensor, max_shift: int) -> Tensor:
    """Every ``(S - 2s)²`` window of ``[N, S, S]`` images, standardised: ``[N, (2s+1)², L]``.

    Window ``(dy, dx)`` starts at row ``dy`` and column ``dx``; the centre (s, s) is unshifted.
    """
    side = images.shape[-1] - 2 * max_shift
    windows = images.unfold(1, side, 1).unfold(2, side, 1)  # [N, 2s+1, 2s+1, side, side]
    return _standardise(windows.reshape(len(images), (2 * max_shift + 1) ** 2, side * side))


def centres(images: Tensor, max_shift: int) -> Tensor:
    """The central ``(S - 2s)²`` square of ``[N, S, S]`` images, standardised: ``[N, L]``."""
    s = max_shift
    crop = images[:, s : images.shape[-2] - s, s : images.shape[-1] - s] if s else images
    return _standardise(crop.reshape(len(images), -1))


def nearest_train(
    images: Tensor,
    train: Tensor,
    max_shift: int = 2,
    candidates: int = 32,
    size: int = AUDIT_SIZE,
    chunk: int = 64,
) -> pd.DataFrame:
    """Each image's most similar training image under shifts (see the module doc).

    ``images`` and ``train`` are uint8 ``[N, C, H, W]`` (any size; reduced to ``size`` px).
    Columns: ``sample_index, nearest_train, similarity, shift_y, shift_x`` (the image is the
    training image moved by this many ``size`` px pixels, down and right), and ``flagged``
    (False here).
    """
    if len(images) == 0 or len(train) == 0:
        return pd.DataFrame(columns=list(COLUMNS)).astype(COLUMNS)
    pre_shift = max(1, round(max_shift * PRESELECT_SIZE / size))
    train_small = centres(gray_copies(train, PRESELECT_SIZE), pre_shift)
    k = min(candidates, len(train))
    rows = []
    for start in range(0, len(images), chunk):
        batch = images[start : start + chunk]
        small = shifted_windows(gray_copies(batch, PRESELECT_SIZE), pre_shift)
        coarse = torch.einsum("nsl,ml->nsm", small, train_small).amax(dim=1)
        picked = coarse.topk(k, dim=1).indices  # [n, k]
        windows = shifted_windows(gray_copies(batch, size), max_shift)  # [n, shifts, L]
        unique, inverse = picked.unique(return_inverse=True)  # full size only for candidates
        picked_centres = centres(gray_copies(train[unique], size), max_shift)[inverse]
        scores = torch.einsum("nsl,nkl->nsk", windows, picked_centres)
        best_over_shifts, shift = scores.max(dim=1)  # [n, k]
        best, pos = best_over_shifts.max(dim=1)
        for offset in range(len(batch)):
            window = int(shift[offset, pos[offset]])
            # the sample's window at (dy, dx) matched the training image's centre: the sample
            # is the training image moved by (dy - s, dx - s)
            dy, dx = divmod(window, 2 * max_shift + 1)
            rows.append(
                {
                    "sample_index": start + offset,
                    "nearest_train": int(picked[offset, pos[offset]]),
                    "similarity": float(best[offset]),
                    "shift_y": dy - max_shift,
                    "shift_x": dx - max_shift,
                    "flagged": False,
                }
            )
    return pd.DataFrame(rows).astype(COLUMNS)


def calibrate(null: np.ndarray, quantile: float) -> float:
    """The flagging threshold: the ``quantile`` of the null similarities (the next observed
    value up, so a small null gives its maximum rather than an interpolation)."""
    if len(null) == 0:
        raise ValueError("memorization: no held-out images to calibrate the threshold on")
    return float(np.quantile(np.asarray(null, dtype=np.float64), quantile, method="higher"))


def audit(
    samples: Tensor,
    heldout: Tensor,
    train: Tensor,
    quantile: float = 0.99,
    max_shift: int = 2,
    candidates: int = 32,
    size: int = AUDIT_SIZE,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Nearest-training table of the samples (``flagged`` filled in) and the audit summary.

    ``heldout`` are real images of no training patient (the test split): their
    nearest-training similarities are the null the threshold is calibrated on.
    """
    null_table = nearest_train(heldout, train, max_shift, candidates, size)
    null = null_table["similarity"].to_numpy()
    threshold = calibrate(null, quantile)
    table = nearest_train(samples, train, max_shift, candidates, size)
    table["flagged"] = table["similarity"] > threshold
    n, flagged = len(table), int(table["flagged"].sum())
    summary = {
        "n_samples": n,
        "n_flagged": flagged,
        "fraction_flagged": flagged / n if n else None,
        "threshold": threshold,
        "quantile": quantile,
        "n_null": len(null),
        "expected_heldout_flag_rate": max(1.0 - quantile, 1.0 / (len(null) + 1)),
        "null_similarity": [float(v) for v in null],
        "sample_similarity": [float(v) for v in table["similarity"]],
        "max_shift": max_shift,
        "image_size": size,
        "candidates": candidates,
    }
    return table, summary


def shown_pairs(table: pd.DataFrame, cap: int) -> pd.DataFrame:
    """The rows to show as figures: the ``cap`` most similar flagged samples, or when none is
    flagged the ``cap`` most similar samples."""
    flagged = table[table["flagged"]]
    return (flagged if len(flagged) else table).nlargest(cap, "similarity")
