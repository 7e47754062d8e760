"""The image sets the evaluation compares, read once: the generated samples of each model, the
real test images matched to them, the train split and the memorization audit's held-out null.

Images are read in batches and reduced as they are read (features; grayscale histograms;
grayscale 64 px copies for the audit; native-size grayscale for MS-SSIM), so memory stays bounded
by those reductions. An unreadable image, images of different sizes within a set, or a file listed
twice in the manifest stop the stage with one line naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, UnidentifiedImageError

from idc_diffusion.evaluate import intensity as I
from idc_diffusion.evaluate import metrics as M
from idc_diffusion.evaluate.adherence import gaussian_blur
from idc_diffusion.evaluate.features import FeatureExtractor
from idc_diffusion.evaluate.matching import subset_indices
from idc_diffusion.evaluate.memorization import AUDIT_SIZE

BATCH_SIZE = 32
SUBSET_SEED = 0


def read_manifest(samples_dir: Path) -> pd.DataFrame:
    """The sample manifest; ValueError naming the file when missing or empty."""
    path = Path(samples_dir) / "manifest.parquet"
    if not path.is_file():
        raise ValueError(f"{path}: sample manifest not found")
    manifest = pd.read_parquet(path)
    if manifest.empty:
        raise ValueError(f"{path}: sample manifest is empty (no generated images)")
    missing = {"file_name", "prompt"} - set(manifest.columns)
    if missing:
        raise ValueError(f"{path}: missing columns {sorted(missing)}")
    repeated = manifest["file_name"][manifest["file_name"].duplicated()]
    if len(repeated):
        raise ValueError(
            f"{path}: {len(repeated)} duplicated rows (e.g. {repeated.iloc[0]!r} listed more than "
            "once); every sample must be counted once: rerun the sample stage"
        )
    if "prompt_index" not in manifest.columns:
        codes = {p: i for i, p in enumerate(dict.fromkeys(manifest["prompt"]))}
        manifest = manifest.assign(prompt_index=manifest["prompt"].map(codes))
    order = [c for c in ("prompt_index", "seed", "file_name") if c in manifest.columns]
    return manifest.sort_values(order, ignore_index=True)


def choose_real(entries: list[dict], cap: int, seed: int = SUBSET_SEED) -> list[dict]:
    """At most ``cap`` entries: a seeded random subset, kept in file order."""
    return [entries[i] for i in subset_indices(len(entries), cap, seed)]


def load_rgb(path: Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 HxWx3 (grayscale repeated); ValueError naming the file when it cannot be decoded
    or, with ``size`` (w, h), has another size (never resized: that would hide a mix-up)."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a readable image ({exc}); regenerate it or remove it from its list"
        ) from exc
    if size is not None and rgb.size != size:
        raise ValueError(
            f"{path}: {rgb.size[0]}x{rgb.size[1]} px, but the other images of its set are "
            f"{size[0]}x{size[1]}; one set must not mix sizes (regenerate it at one size)"
        )
    return np.asarray(rgb)


def gray_of(rgb: np.ndarray) -> np.ndarray:
    """uint8 grayscale HxW of an HxWx3 image (ITU-R 601 luma, as PIL's "L")."""
    return np.asarray(Image.fromarray(rgb).convert("L"))


def small_gray(gray: np.ndarray, side: int = AUDIT_SIZE) -> np.ndarray:
    """uint8 ``side x side`` grayscale copy (bilinear with reduction)."""
    image = Image.fromarray(gray)
    return (
        np.asarray(image.resize((side, side), Image.BILINEAR))
        if image.size != (side, side)
        else gray
    )


def to_chw(arrays: Sequence[np.ndarray]) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` from HxW or HxWxC arrays."""
    stacked = np.stack(arrays)
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    return torch.from_numpy(np.ascontiguousarray(stacked))


class ImageSet:
    """Images read in batches, reduced on the way: features, native grayscale, audit copies."""

    def __init__(self, paths: Sequence[Path], keep_gray: bool, keep_small: bool) -> None:
        self.paths = [Path(p) for p in paths]
        self.keep_gray, self.keep_small = keep_gray, keep_small
        self.gray: list[np.ndarray] = []
        self.small: list[np.ndarray] = []
        self.hists: list[np.ndarray] = []
        self.size: tuple[int, int] | None = None

    def batches(self, batch_size: int = BATCH_SIZE) -> Iterator[torch.Tensor]:
        """uint8 RGB batches ``[B, 3, H, W]``; ValueError naming an image of another size."""
        if self.size is None and self.paths:
            first = load_rgb(self.paths[0])
            self.size = (first.shape[1], first.shape[0])
        for start in range(0, len(self.paths), batch_size):
            rgbs = [load_rgb(p, self.size) for p in self.paths[start : start + batch_size]]
            for rgb in rgbs:
                gray = gray_of(rgb)
                self.hists.append(I.gray_histogram(gray))
                if self.keep_gray:
                    self.gray.append(gray)
                if self.keep_small:
                    self.small.append(small_gray(gray))
            yield to_chw(rgbs)

    def features(self, extractor: FeatureExtractor) -> torch.Tensor:
        """Features of every image (reading them, and filling the kept copies)."""
        return M.extract_features(self.batches(), extractor)

    def read(self) -> None:
        """Read every image, filling the kept copies (no features)."""
        for _ in self.batches():
            pass

    def small_tensor(self) -> torch.Tensor:
        """The kept 64 px audit copies as uint8 ``[N, 1, S, S]`` (empty when none)."""
        return to_chw(self.small) if self.small else torch.zeros(0, 1, AUDIT_SIZE, AUDIT_SIZE)


@dataclass
class ModelSamples:
    """One model's generated images: manifest, images, features, and each prompt's fields."""

    name: str
    samples_dir: Path
    manifest: pd.DataFrame
    images: ImageSet
    features: torch.Tensor
    fields: list[dict | None]


def read_model_samples(
    name: str, samples_dir: Path, extractor: FeatureExtractor, captions: dict[str, dict]
) -> ModelSamples:
    """Read a sample folder (manifest + images) and extract its features once."""
    manifest = read_manifest(samples_dir)
    images = ImageSet([samples_dir / f for f in manifest["file_name"]], True, True)
    features = images.features(extractor)
    fields = [captions.get(str(prompt)) for prompt in manifest["prompt"]]
    return ModelSamples(name, samples_dir, manifest, images, features, fields)


@dataclass
class RealSets:
    """The real images every model is compared with, read once.

    ``test``: every test entry; ``train``: the train split's images (64 px copies kept for the
    memorization audit) and features, None without a train split; ``train_blurred``: blur
    sigma -> features of the train images blurred by it (the adherence classifier's extra
    rows); ``heldout``: the audit's null (a seeded subset of the test images, 64 px copies).
    """

    dataset_dir: Path
    test_entries: list[dict]
    train_entries: list[dict]
    train: tuple[ImageSet, torch.Tensor] | None
    train_blurred: dict[float, torch.Tensor]
    heldout: ImageSet | None
    _matched: dict[tuple[int, ...], tuple[ImageSet, torch.Tensor]]

    def matched(
        self, indices: list[int], extractor: FeatureExtractor
    ) -> tuple[ImageSet, torch.Tensor]:
        """The test images at ``indices`` (grayscale kept) and their features, read once."""
        key = tuple(indices)
        if key not in self._matched:
            paths = [self.dataset_dir / "test" / self.test_entries[i]["file_name"] for i in key]
            images = ImageSet(paths, True, False)
            self._matched[key] = (images, images.features(extractor))
        return self._matched[key]


def read_real_sets(
    dataset_dir: Path,
    test_entries: list[dict],
    train_entries: list[dict],
    extractor: FeatureExtractor,
    settings: dict,
) -> RealSets:
    """Read the train split (features, blurred copies' features, audit copies) and the
    audit's held-out null once."""
    train = heldout = None
    blurred: dict[float, torch.Tensor] = {}
    if train_entries:
        paths = [dataset_dir / "train" / e["file_name"] for e in train_entries]
        train_set = ImageSet(paths, False, True)
        train = (train_set, train_set.features(extractor))
        for sigma in map(float, settings["adherence_blur"]):
            batches = ImageSet(paths, False, False).batches()
            blurred[sigma] = M.extract_features(
                (gaussian_blur(b, sigma) for b in batches), extractor
            )
        null_entries = choose_real(
            test_entries, int(settings["max_real_images"]), int(settings["seed"])
        )
        heldout = ImageSet(
            [dataset_dir / "test" / e["file_name"] for e in null_entries], False, True
        )
        heldout.read()
    return RealSets(dataset_dir, test_entries, train_entries, train, blurred, heldout, {})
