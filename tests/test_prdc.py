"""PRDC against hand-worked examples and its defining properties."""

from __future__ import annotations

import pytest
import torch

from idc_diffusion.evaluate.prdc import knn_radii, prdc


def test_knn_radii_on_a_line() -> None:
    points = torch.tensor([[0.0], [1.0], [3.0], [6.0]])
    assert knn_radii(points, 1).tolist() == [1.0, 1.0, 2.0, 3.0]
    assert knn_radii(points, 2).tolist() == [3.0, 2.0, 3.0, 5.0]
    with pytest.raises(ValueError, match="k < number"):
        knn_radii(points, 4)


def test_hand_worked_example() -> None:
    real = torch.tensor([[0.0], [1.0], [2.0], [3.0]])  # k=1 radii: 1, 1, 1, 1
    fake = torch.tensor([[0.5], [10.0], [11.0]])  # k=1 radii: 9.5, 1, 1
    out = prdc(real, fake, k=1)
    assert out["precision"] == pytest.approx(1 / 3)  # only 0.5 lies in a real ball
    assert out["density"] == pytest.approx(2 / 3)  # 0.5 is in the balls of 0 and 1
    assert out["coverage"] == pytest.approx(2 / 4)  # balls of 0 and 1 hold 0.5
    assert out["recall"] == pytest.approx(1.0)  # 0.5's ball (radius 9.5) holds all reals


def test_identical_sets_and_disjoint_sets() -> None:
    x = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    same = prdc(x, x.clone(), k=3)
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    assert same["density"] >= 1.0
    far = prdc(x, x + 100.0, k=3)
    assert far["precision"] == far["recall"] == far["coverage"] == far["density"] == 0.0


def test_order_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    real, fake = torch.randn(40, 5, generator=g), torch.randn(30, 5, generator=g) + 0.5
    a = prdc(real, fake, k=4)
    b = prdc(real[torch.randperm(40, generator=g)], fake[torch.randperm(30, generator=g)], k=4)
    for key in ("precision", "recall", "density", "coverage"):
        assert a[key] == pytest.approx(b[key], abs=1e-12)
