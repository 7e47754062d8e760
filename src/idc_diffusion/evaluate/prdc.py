"""Precision, recall, density and coverage of generated vs real features (Naeem et al. 2020).

With ``k``-nearest-neighbour radii in feature space (Euclidean, float64):

- precision: fraction of generated samples inside at least one real sample's k-NN ball;
- recall: fraction of real samples inside at least one generated sample's k-NN ball;
- density: ``1 / (k M)`` times the number of (generated, real ball) containments, summed over
  the ``M`` generated samples (1 on average when the two distributions match; can exceed 1);
- coverage: fraction of real samples whose k-NN ball holds at least one generated sample.

Reference: Naeem, Oh, Uh, Choi, Yoo, "Reliable Fidelity and Diversity Metrics for Generative
Models", ICML 2020 (arXiv:2002.09797).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def knn_radii(features: Tensor, k: int) -> Tensor:
    """Distance of each row to its ``k``-th nearest other row (float64)."""
    n = len(features)
    if not 1 <= k < n:
        raise ValueError(f"PRDC needs 1 <= k < number of images (k={k}, n={n})")
    distances = torch.cdist(features.double(), features.double())
    return distances.kthvalue(k + 1, dim=1).values  # +1: the row itself is at distance 0


def prdc(real: Tensor, fake: Tensor, k: int = 5) -> dict[str, Any]:
    """Precision, recall, density and coverage (see the module doc) with ``k`` neighbours."""
    real, fake = real.double(), fake.double()
    real_radii = knn_radii(real, k)
    fake_radii = knn_radii(fake, k)
    distances = torch.cdist(real, fake)  # [n_real, n_fake]
    in_real_ball = distances <= real_radii[:, None]
    in_fake_ball = distances <= fake_radii[None, :]
    return {
        "precision": float(in_real_ball.any(dim=0).double().mean()),
        "recall": float(in_fake_ball.any(dim=1).double().mean()),
        "density": float(in_real_ball.double().sum() / (k * len(fake))),
        "coverage": float((distances.min(dim=1).values < real_radii).double().mean()),
        "k": k,
        "n_real": len(real),
        "n_generated": len(fake),
    }
