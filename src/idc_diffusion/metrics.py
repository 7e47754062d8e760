"""Evaluation metrics: FID/KID, MS-SSIM diversity, and a memorization audit.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``
(no torch-fidelity needed with a custom ``nn.Module``). Features are extracted once per
image in batches (:func:`extract_features`) and fed to both metrics through a pass-through
module, so the extractor runs once and the same features serve the memorization audit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from idc_diffusion.features import FeatureExtractor

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
Images = Tensor | Iterable[Tensor]


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batches(images: Images, batch_size: int) -> Iterator[Tensor]:
    """Batches of at most ``batch_size`` from a tensor, or the given iterable of batches."""
    if isinstance(images, Tensor):
        yield from images.split(batch_size)
    else:
        yield from images


@torch.no_grad()
def extract_features(
    images: Images,
    extractor: nn.Module,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Float64 features ``[N, D]`` (on CPU) of uint8 images, a tensor or iterable of batches."""
    device = torch.device(device) if device is not None else default_device()
    extractor = extractor.to(device).eval()
    chunks = [extractor(batch.to(device)).double().cpu() for batch in _batches(images, batch_size)]
    if not chunks:
        return torch.zeros(0, int(getattr(extractor, "num_features", 0)), dtype=torch.float64)
    return torch.cat(chunks)


def canonical_order(features: Tensor) -> Tensor:
    """Rows sorted lexicographically: the same set of rows in any order gives the same tensor.

    Seeded subsets (KID) and bootstrap draws index rows by position, so sorting first makes
    every metric independent of the order the images were read in.
    """
    if len(features) < 2:
        return features
    keys = features.detach().double().cpu().numpy()
    return features[torch.from_numpy(np.lexsort(keys.T[::-1]).copy())]


class _Precomputed(nn.Module):
    """Pass-through "extractor" so torchmetrics can consume already extracted features."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def fid_kid_from_features(
    real_feats: Tensor,
    fake_feats: Tensor,
    kid_subset_size: int | None = 50,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID (mean, std) between two feature sets, via torchmetrics, in float64.

    KID's subset size is ``min(kid_subset_size, n_real, n_fake)`` (all images when None); its
    random subsets are drawn under ``seed`` so the numbers are reproducible.
    """
    n_real, n_fake = len(real_feats), len(fake_feats)
    if n_real < 2 or n_fake < 2:
        raise ValueError(
            f"FID/KID need at least 2 real and 2 generated images ({n_real}, {n_fake})"
        )
    dim = int(real_feats.shape[1])
    real_feats, fake_feats = canonical_order(real_feats), canonical_order(fake_feats)
    subset = min(kid_subset_size or max(n_real, n_fake), n_real, n_fake)
    fid = FrechetInceptionDistance(feature=_Precomputed(dim))
    with warnings.catch_warnings():  # "KID keeps all features in memory": intended here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset
        )
    for metric in (fid, kid):
        metric.update(real_feats.double(), real=True)
        metric.update(fake_feats.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "fid": max(float(fid.compute()), 0.0),
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
        "n_real": n_real,
        "n_generated": n_fake,
    }


def fid_kid(
    real: Images,
    fake: Images,
    extractor: FeatureExtractor,
    kid_subset_size: int | None = 50,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """FID and KID of uint8 images (tensors or iterables of batches) with ``extractor``.

    The result records ``feature_extractor`` (name, weights sha256, is_random) beside the numbers.
    """
    real_feats = extract_features(real, extractor, batch_size, device)
    fake_feats = extract_features(fake, extractor, batch_size, device)
    result = fid_kid_from_features(real_feats, fake_feats, kid_subset_size)
    return {**result, "feature_extractor": extractor.describe()}


def to_gray_float(images: Tensor) -> Tensor:
    """uint8 ``[N, 1|3, H, W]`` → float32 grayscale ``[N, 1, H, W]`` in [0, 1] (ITU-R 601 luma)."""
    x = images.float() / 255.0
    if x.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        x = (x * weights).sum(dim=1, keepdim=True)
    return x


def ms_ssim_config(height: int, width: int, kernel_size: int = 7) -> dict[str, Any]:
    """Kernel size, scales and betas that MS-SSIM can use at this resolution.

    Rule: Gaussian kernel 7 (sigma 1.5), shrunk to the largest odd size ≤ the min side when smaller;
    as many of the 5 standard scales as keep the coarsest scale at least ``kernel_size`` pixels
    on its min side (and satisfy torchmetrics' own size check); the standard betas of the
    scales used, renormalised to sum to 1. At 64 px this is 4 scales, at 256 px and up all 5.
    """
    side = min(height, width)
    kernel = min(kernel_size, side if side % 2 else side - 1)
    scales = 1
    for n in range(len(MS_SSIM_BETAS), 0, -1):
        coarsest = side // 2 ** (n - 1)
        tm_ok = side >= 2**n and side // max(1, n - 1) ** 2 > kernel - 1
        if coarsest >= kernel and tm_ok:
            scales = n
            break
    betas = MS_SSIM_BETAS[:scales]
    total = sum(betas)
    return {"kernel_size": kernel, "scales": scales, "betas": tuple(b / total for b in betas)}


def pairwise_ms_ssim(images: Tensor, max_pairs_per_batch: int = 256) -> Tensor:
    """MS-SSIM of every unordered pair of uint8 images ``[K, C, H, W]`` (grayscale, range 1)."""
    gray = to_gray_float(images)
    k = len(gray)
    if k < 2:
        return torch.zeros(0)
    cfg = ms_ssim_config(*gray.shape[-2:])
    i_idx, j_idx = torch.triu_indices(k, k, offset=1)
    values = []
    for start in range(0, len(i_idx), max_pairs_per_batch):
        i, j = (
            i_idx[start : start + max_pairs_per_batch],
            j_idx[start : start + max_pairs_per_batch],
        )
        if cfg["scales"] == 1:
            out = structural_similarity_index_measure(
                gray[i], gray[j], kernel_size=cfg["kernel_size"], data_range=1.0, reduction="none"
            )
        else:
            out = multiscale_structural_similarity_index_measure(
                gray[i],
                gray[j],
                kernel_size=cfg["kernel_size"],
                betas=cfg["betas"],
                data_range=1.0,
                reduction="none",
                normalize="relu",
            )
        values.append(out.reshape(-1))
    return torch.cat(values)


def ms_ssim_diversity(images_by_prompt: dict[str, Tensor]) -> dict[str, Any]:
    """Mean pairwise MS-SSIM among the samples of each prompt (lower = more diverse).

    Images are uint8 ``[K, C, H, W]`` per prompt, compared in grayscale with the scales of
    :func:`ms_ssim_config` and torchmetrics' "relu" normalisation (negative contrast terms
    clamped to 0, so values lie in [0, 1]). ``overall`` is the mean of the per-prompt means;
    prompts with fewer than 2 samples are reported with ``mean: None`` and left out of it.
    """
    per_prompt: dict[str, dict[str, Any]] = {}
    config: dict[str, Any] | None = None
    for prompt, images in images_by_prompt.items():
        values = pairwise_ms_ssim(images)
        if config is None and len(images):
            config = ms_ssim_config(*images.shape[-2:])
        mean = float(values.mean()) if len(values) else None
        per_prompt[prompt] = {"mean": mean, "pairs": len(values), "samples": len(images)}
    means = [p["mean"] for p in per_prompt.values() if p["mean"] is not None]
    return {
        "overall": float(np.mean(means)) if means else None,
        "per_prompt": per_prompt,
        "prompts_scored": len(means),
        "kernel_size": config["kernel_size"] if config else None,
        "scales": config["scales"] if config else None,
    }


def reduce_gray(images: Tensor, size: int) -> Tensor:
    """uint8 images → float32 grayscale ``[N, 1, size, size]`` in [0, 1] (area/bilinear resize)."""
    gray = to_gray_float(images)
    if gray.shape[-2:] != (size, size):
        gray = F.interpolate(gray, size=(size, size), mode="bilinear", antialias=True)
    return gray


def _unit_rows(x: Tensor) -> Tensor:
    return F.normalize(x.double().reshape(len(x), -1), dim=1)


def _zero_mean_rows(x: Tensor) -> Tensor:
    flat = x.reshape(len(x), -1).double()
    return F.normalize(flat - flat.mean(dim=1, keepdim=True), dim=1)


MEMO_COLUMNS = {
    "sample_index": "int64",
    "nearest_train_by_cosine": "int64",
    "cosine": "float64",
    "nearest_train_by_ssim": "int64",
    "ssim": "float64",
    "flagged": "bool",
}


def memorization(
    samples: Tensor,
    train: Tensor,
    sample_feats: Tensor,
    train_feats: Tensor,
    threshold: float = 0.95,
    top_k: int = 32,
    ssim_threshold: float = 0.9,
    ssim_size: int = 64,
    chunk: int = 256,
) -> pd.DataFrame:
    """Nearest training image of each generated sample, in feature space and in pixel space.

    - by cosine: cosine similarity of ``sample_feats`` to every row of ``train_feats``, both
      centred on the mean training feature (raw CNN features share a large common component,
      which pushes the cosine of unrelated images towards 1; centring removes it, and an
      exact copy still scores 1);
    - by SSIM: grayscale SSIM at ``ssim_size`` px (kernel 7). To scale to tens of thousands of
      training images, the ``top_k`` candidates with the highest cosine of 32x32 zero-mean
      pixels (Pearson correlation) are pre-selected, then exact SSIM picks the nearest of them.

    ``samples``/``train`` are uint8 ``[N, C, H, W]`` (any size; ``train`` may already be
    reduced). A sample is ``flagged`` when cosine ≥ ``threshold`` or SSIM ≥ ``ssim_threshold``.
    """
    if len(train) == 0 or len(samples) == 0:
        return pd.DataFrame(columns=list(MEMO_COLUMNS)).astype(MEMO_COLUMNS)
    centre = train_feats.double().mean(dim=0) if len(train_feats) > 1 else 0.0
    s_unit = _unit_rows(sample_feats.double() - centre)
    t_unit = _unit_rows(train_feats.double() - centre)
    t_small = _zero_mean_rows(reduce_gray(train, 32))
    k = min(top_k, len(train))
    rows = []
    for start in range(0, len(samples), chunk):
        batch = samples[start : start + chunk]
        cos_best, cos_idx = (s_unit[start : start + chunk] @ t_unit.T).max(dim=1)
        candidates = (_zero_mean_rows(reduce_gray(batch, 32)) @ t_small.T).topk(k, dim=1).indices
        ssim_best, ssim_idx = _best_ssim(
            reduce_gray(batch, ssim_size), train, candidates, ssim_size
        )
        for offset in range(len(batch)):
            cos, ssim = float(cos_best[offset]), float(ssim_best[offset])
            rows.append(
                {
                    "sample_index": start + offset,
                    "nearest_train_by_cosine": int(cos_idx[offset]),
                    "cosine": cos,
                    "nearest_train_by_ssim": int(ssim_idx[offset]),
                    "ssim": ssim,
                    "flagged": cos >= threshold or ssim >= ssim_threshold,
                }
            )
    return pd.DataFrame(rows).astype(MEMO_COLUMNS)


def _best_ssim(
    samples_gray: Tensor, train: Tensor, candidates: Tensor, size: int
) -> tuple[Tensor, Tensor]:
    """Highest SSIM (and its train index) of each sample among its candidate train images."""
    n, k = candidates.shape
    flat = candidates.reshape(-1)
    unique, inverse = flat.unique(return_inverse=True)
    cand_gray = reduce_gray(train[unique], size)[inverse]
    preds = samples_gray.repeat_interleave(k, dim=0)
    kernel = ms_ssim_config(size, size)["kernel_size"]
    scores = structural_similarity_index_measure(
        preds, cand_gray, kernel_size=kernel, data_range=1.0, reduction="none"
    ).reshape(n, k)
    best, pos = scores.max(dim=1)
    return best.double(), candidates.gather(1, pos[:, None]).squeeze(1)


def memorization_summary(
    table: pd.DataFrame, threshold: float, ssim_threshold: float, top_k: int
) -> dict[str, Any]:
    """Counts and extremes of a :func:`memorization` table."""
    n = len(table)
    flagged = int(table["flagged"].sum()) if n else 0

    def _max(column: str) -> float | None:
        return float(table[column].max()) if n and not math.isnan(table[column].max()) else None

    return {
        "n_samples": n,
        "n_flagged": flagged,
        "fraction_flagged": flagged / n if n else None,
        "cosine_threshold": threshold,
        "ssim_threshold": ssim_threshold,
        "max_cosine": _max("cosine"),
        "max_ssim": _max("ssim"),
        "ssim_candidates": top_k,
    }


def top_pairs(table: pd.DataFrame, n: int) -> pd.DataFrame:
    """The ``n`` samples most similar to a training image (by max of cosine and SSIM rank)."""
    if table.empty:
        return table
    score = table[["cosine", "ssim"]].max(axis=1)
    return table.assign(_score=score).nlargest(n, "_score").drop(columns="_score")


# ----------------------------------------------------------------------------- bootstrap


def _cov_factor(features: Tensor) -> Tensor:
    """A matrix ``A`` with ``A @ A.T`` = the unbiased covariance of ``features`` ``[N, D]``.

    ``[D, N]`` centred rows when N <= D (cheap), else ``[D, D]`` from an eigendecomposition.
    """
    x = features.double()
    centred = (x - x.mean(dim=0)).T / math.sqrt(max(len(x) - 1, 1))
    if len(x) <= x.shape[1]:
        return centred
    values, vectors = torch.linalg.eigh(centred @ centred.T)
    return vectors * values.clamp_min(0).sqrt()


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """FID between two feature sets: ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂), in float64.

    tr √(Σ₁Σ₂) is the nuclear norm of ``A₁ᵀ A₂`` for covariance factors ``Aᵢ Aᵢᵀ = Σᵢ``
    (its singular values are the square roots of the eigenvalues of Σ₁Σ₂), so no matrix
    square root is needed and the cost follows min(N, D).
    """
    a, b = _cov_factor(real), _cov_factor(fake)
    mean_term = float(((real.double().mean(0) - fake.double().mean(0)) ** 2).sum())
    trace_sqrt = float(torch.linalg.svdvals(a.T @ b).sum())
    value = mean_term + float((a * a).sum()) + float((b * b).sum()) - 2.0 * trace_sqrt
    return max(value, 0.0)


def polynomial_kernel(x: Tensor, y: Tensor) -> Tensor:
    """KID's kernel ``(x·y / D + 1)³`` in float64."""
    return (x.double() @ y.double().T / x.shape[1] + 1.0) ** 3


def mmd2_unbiased(k_xx: Tensor, k_yy: Tensor, k_xy: Tensor) -> float:
    """Unbiased squared MMD from the three kernel matrices (KID for the polynomial kernel)."""
    m, n = len(k_xx), len(k_yy)
    xx = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    yy = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return float(xx + yy - 2.0 * k_xy.mean())


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of bootstrap replicates."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def bootstrap_fid_kid(
    real: Tensor, fake: Tensor, n_resamples: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """Percentile bootstrap intervals of FID and KID: both sets resampled with replacement.

    Each replicate draws ``len(real)`` real and ``len(fake)`` generated rows with replacement
    (one seeded numpy generator), then computes :func:`frechet_distance` and the unbiased KID
    on all drawn rows (kernel matrices computed once, indexed per replicate).
    """
    if n_resamples < 1:
        return {"n_resamples": 0}
    real, fake = canonical_order(real).double(), canonical_order(fake).double()
    rng = np.random.default_rng(seed)
    k_rr, k_ff, k_rf = (
        polynomial_kernel(real, real),
        polynomial_kernel(fake, fake),
        polynomial_kernel(real, fake),
    )
    fids, kids = np.empty(n_resamples), np.empty(n_resamples)
    for b in range(n_resamples):
        i = torch.from_numpy(rng.integers(0, len(real), len(real)))
        j = torch.from_numpy(rng.integers(0, len(fake), len(fake)))
        fids[b] = frechet_distance(real[i], fake[j])
        kids[b] = mmd2_unbiased(k_rr[i][:, i], k_ff[j][:, j], k_rf[i][:, j])
    return {
        "n_resamples": n_resamples,
        "seed": seed,
        "level": level,
        "fid_ci": percentile_interval(fids, level),
        "fid_std": float(fids.std(ddof=1)) if n_resamples > 1 else None,
        "kid_ci": percentile_interval(kids, level),
        "kid_std": float(kids.std(ddof=1)) if n_resamples > 1 else None,
    }
