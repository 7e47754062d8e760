"""Feature extractors: shapes, seeding, hashes, TorchScript loading, config errors."""

from __future__ import annotations

import hashlib

import pytest
import torch
from torch import nn

from idc_diffusion.features import (
    RandomConvFeatures,
    TorchScriptFeatures,
    build_extractor,
)


def test_random_features_shape_and_determinism() -> None:
    images = torch.randint(0, 256, (5, 3, 48, 40), dtype=torch.uint8)
    extractor = RandomConvFeatures(seed=0)
    out = extractor(images)
    assert out.shape == (5, 64) and out.dtype == torch.float32
    assert torch.equal(out, RandomConvFeatures(seed=0)(images))
    assert extractor.is_random and extractor.num_features == 64


def test_grayscale_equals_repeated_rgb() -> None:
    gray = torch.randint(0, 256, (3, 1, 32, 32), dtype=torch.uint8)
    extractor = RandomConvFeatures(seed=1)
    assert torch.allclose(extractor(gray), extractor(gray.repeat(1, 3, 1, 1)))


def test_hash_stable_for_seed_and_changes_with_seed() -> None:
    a, b, c = RandomConvFeatures(0), RandomConvFeatures(0), RandomConvFeatures(1)
    assert a.weights_sha256 == b.weights_sha256
    assert a.weights_sha256 != c.weights_sha256
    assert len(a.weights_sha256) == 64
    assert a.describe()["is_random"] is True


def test_rejects_float_images() -> None:
    with pytest.raises(TypeError, match="uint8"):
        RandomConvFeatures(0)(torch.rand(1, 3, 8, 8))


class _Probe(nn.Module):
    """Records its input range and size; returns [N, 5] features."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stats = torch.stack([x.amin(dim=(1, 2, 3)), x.amax(dim=(1, 2, 3))], dim=1)
        size = torch.full((x.shape[0], 1), float(x.shape[-1]))
        return torch.cat([stats, size, x.mean(dim=(2, 3))[:, :2]], dim=1)


class _WithFlag(nn.Module):
    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        n = x.shape[0]
        return torch.ones(n, 7) if return_features else torch.zeros(n, 3)


def test_torchscript_features(tmp_path) -> None:
    path = tmp_path / "probe.pt"
    torch.jit.script(_Probe()).save(str(path))
    extractor = TorchScriptFeatures(path, input_size=40)
    assert extractor.num_features == 5 and not extractor.is_random
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    images = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    images[:, :, :, 32:] = 255
    out = extractor(images)
    assert out.shape == (2, 5)
    assert out[0, 0] == pytest.approx(0, abs=1e-3)  # float input in [0, 255], not rescaled
    assert out[0, 1] == pytest.approx(255, abs=1e-3)
    assert out[0, 2] == 40  # resized to input_size


def test_torchscript_return_features_flag(tmp_path) -> None:
    path = tmp_path / "flag.pt"
    torch.jit.script(_WithFlag()).save(str(path))
    extractor = build_extractor({"kind": "torchscript", "path": str(path), "input_size": 16})
    assert extractor.num_features == 7


def test_build_extractor_errors(tmp_path) -> None:
    assert build_extractor({"kind": "random", "seed": 3}).seed == 3
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        build_extractor({"kind": "torchscript", "path": str(missing)})
    with pytest.raises(ValueError, match="path"):
        build_extractor({"kind": "torchscript", "path": None})
    with pytest.raises(ValueError, match="unknown kind"):
        build_extractor({"kind": "clip"})
