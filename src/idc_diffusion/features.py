"""Image feature extractors for FID/KID and the memorization audit.

Every extractor is an ``nn.Module`` that takes **uint8** images ``[N, C, H, W]`` (C is 1 or 3;
grayscale is repeated to 3 channels) and returns float features ``[N, D]``. Each carries
``name``, ``weights_sha256`` (what the numbers were computed with), ``num_features`` (D, which
torchmetrics reads instead of running a dummy forward) and ``is_random``.

- :class:`RandomConvFeatures`: a small seeded, randomly initialised conv net. For tests and the
  offline demo ONLY: its FID is not comparable to any published FID.
- :class:`TorchScriptFeatures`: any TorchScript module from a file, e.g. the FID Inception-v3
  (``inception-2015-12-05.pt`` of StyleGAN2-ADA / clean-fid). Convention: uint8 images are
  converted to float **in [0, 255]** (not rescaled), resized bilinearly to ``input_size`` and
  passed as ``[N, 3, input_size, input_size]``; that is what the FID Inception TorchScript
  expects (it normalises internally). If the module's ``forward`` has a ``return_features``
  argument it is called with ``return_features=True`` (pool3 features, not class logits).
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idc_diffusion.hashing import file_sha256


def _as_rgb_float(images: Tensor) -> Tensor:
    """uint8 ``[N, 1|3, H, W]`` → float32 ``[N, 3, H, W]`` in [0, 255]."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"expected images [N, 1|3, H, W], got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise TypeError(f"expected uint8 images, got {images.dtype}")
    x = images.float()
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize to ``size x size`` (no-op when already that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over the module's state dict: sorted keys, each name then its raw tensor bytes."""
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


class FeatureExtractor(nn.Module):
    """Base class: uint8 images ``[N, C, H, W]`` → float features ``[N, num_features]``."""

    name: str
    weights_sha256: str
    num_features: int
    is_random: bool

    def describe(self) -> dict[str, Any]:
        """The identity recorded beside every number computed with this extractor."""
        return {
            "name": self.name,
            "weights_sha256": self.weights_sha256,
            "is_random": self.is_random,
            "num_features": self.num_features,
        }


class RandomConvFeatures(FeatureExtractor):
    """Seeded random conv net (tests and offline demo only; ``is_random=True``).

    Images are scaled to [-1, 1], resized to ``input_size`` (64), passed through three strided
    3x3 conv + ReLU layers, and globally average- and max-pooled into ``num_features`` values.
    """

    def __init__(self, seed: int = 0, num_features: int = 64, input_size: int = 64) -> None:
        super().__init__()
        if num_features % 2:
            raise ValueError("num_features must be even (half mean-, half max-pooled)")
        self.seed = int(seed)
        self.input_size = int(input_size)
        self.num_features = int(num_features)
        self.is_random = True
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            self.net = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(16, 32, 3, stride=2, padding=1),
                nn.ReLU(),
                nn.Conv2d(32, num_features // 2, 3, stride=2, padding=1),
            )
        self.requires_grad_(False)
        self.eval()
        self.weights_sha256 = state_dict_sha256(self)
        self.name = f"random-conv(seed={self.seed}, d={self.num_features})"

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = _resize(_as_rgb_float(images) / 127.5 - 1.0, self.input_size)
        h = self.net(x)
        return torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)


class TorchScriptFeatures(FeatureExtractor):
    """A TorchScript module loaded from ``path`` (float input in [0, 255], see module doc)."""

    def __init__(self, path: str | Path, input_size: int = 299) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature extractor TorchScript file not found: {path}")
        self.path = path
        self.input_size = int(input_size)
        self.is_random = False
        self.weights_sha256 = file_sha256(path)
        with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; still loads
            warnings.simplefilter("ignore", DeprecationWarning)
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.call_kwargs = self._call_kwargs(self.module)
        self.name = f"torchscript:{path.name}"
        self.num_features = int(self._embed(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])

    @staticmethod
    def _call_kwargs(module: torch.jit.ScriptModule) -> dict[str, Any]:
        """``{"return_features": True}`` when the module's forward takes that argument."""
        try:
            arguments = [arg.name for arg in module.forward.schema.arguments]
        except (AttributeError, RuntimeError):
            return {}
        return {"return_features": True} if "return_features" in arguments else {}

    @torch.no_grad()
    def _embed(self, images: Tensor) -> Tensor:
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        x = _resize(_as_rgb_float(images), self.input_size).to(device)
        out = self.module(x, **self.call_kwargs)
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out.reshape(out.shape[0], -1).float()

    def forward(self, images: Tensor) -> Tensor:
        return self._embed(images)


def build_extractor(spec: dict) -> FeatureExtractor:
    """An extractor from the config's ``evaluate.feature_extractor`` section.

    ``{"kind": "random", "seed": 0}`` or
    ``{"kind": "torchscript", "path": ..., "input_size": 299}``.
    """
    kind = spec.get("kind", "random")
    if kind == "random":
        return RandomConvFeatures(seed=int(spec.get("seed") or 0))
    if kind == "torchscript":
        if not spec.get("path"):
            raise ValueError("evaluate.feature_extractor: kind 'torchscript' needs a 'path'")
        return TorchScriptFeatures(spec["path"], input_size=int(spec.get("input_size") or 299))
    raise ValueError(f"evaluate.feature_extractor: unknown kind {kind!r} (random, torchscript)")
