"""Evaluation metrics: FID/KID with valid intervals, PRDC, and MS-SSIM diversity.

FID and KID are torchmetrics' ``FrechetInceptionDistance`` and ``KernelInceptionDistance``
(no torch-fidelity needed with a custom ``nn.Module``). Features are extracted once per
image in batches (:func:`extract_features`) and fed to both metrics through a pass-through
module, so the extractor runs once. :func:`compare_sets` gives FID, KID and PRDC of any two
feature sets with intervals that hold what they claim (:func:`kid_interval`,
:func:`fid_interval`) and n beside every number.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from statistics import NormalDist
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics.functional.image import (
    multiscale_structural_similarity_index_measure,
    structural_similarity_index_measure,
)
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from idc_diffusion.evaluate.features import FeatureExtractor
from idc_diffusion.evaluate.prdc import prdc

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


def subset_kid(
    real_feats: Tensor,
    fake_feats: Tensor,
    kid_subset_size: int | None = 50,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """KID as torchmetrics / torch-fidelity define it: mean and std over random subsets.

    The subset size is ``min(kid_subset_size, n_real, n_fake)`` (all images when None); the
    subsets are drawn under ``seed`` so the numbers are reproducible.
    """
    n_real, n_fake = len(real_feats), len(fake_feats)
    dim = int(real_feats.shape[1])
    subset = min(kid_subset_size or max(n_real, n_fake), n_real, n_fake)
    with warnings.catch_warnings():  # "KID keeps all features in memory": intended here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(
            feature=_Precomputed(dim), subsets=kid_subsets, subset_size=subset
        )
    kid.update(canonical_order(real_feats).double(), real=True)
    kid.update(canonical_order(fake_feats).double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {
        "kid_mean": float(kid_mean),
        "kid_std": float(kid_std),
        "kid_subset_size": subset,
        "kid_subsets": kid_subsets,
    }


def fid_kid_from_features(
    real_feats: Tensor,
    fake_feats: Tensor,
    kid_subset_size: int | None = 50,
    kid_subsets: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """FID and KID (mean, std; :func:`subset_kid`) of two feature sets, via torchmetrics."""
    n_real, n_fake = len(real_feats), len(fake_feats)
    if n_real < 2 or n_fake < 2:
        raise ValueError(
            f"FID/KID need at least 2 real and 2 generated images ({n_real}, {n_fake})"
        )
    fid = FrechetInceptionDistance(feature=_Precomputed(int(real_feats.shape[1])))
    fid.update(canonical_order(real_feats).double(), real=True)
    fid.update(canonical_order(fake_feats).double(), real=False)
    return {
        "fid": max(float(fid.compute()), 0.0),
        **subset_kid(real_feats, fake_feats, kid_subset_size, kid_subsets, seed),
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


# ----------------------------------------------------------------------------- intervals


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


def normal_quantile(level: float) -> float:
    """The two-sided standard normal quantile of ``level`` (1.96 for 0.95)."""
    return NormalDist().inv_cdf(0.5 + level / 2.0)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Equal-tailed percentile interval of bootstrap replicates."""
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def kid_interval(real: Tensor, fake: Tensor, level: float = 0.95) -> dict[str, Any]:
    """KID over all images (unbiased MMD², polynomial kernel) with its jackknife interval.

    The estimate is the U-statistic over every real and generated image (not a subset mean),
    so it is unbiased for the population KID: 0 when both sets come from one distribution,
    and it may be negative. Its standard error is the two-sample delete-one jackknife
    (Arvesen 1969), exact and cheap from the kernel matrices' row sums; by the Efron-Stein
    inequality the jackknife variance is conservative in expectation. The interval is the
    estimate ± z·SE, so it always holds the estimate.
    """
    m, n = len(real), len(fake)
    if m < 3 or n < 3:
        raise ValueError(f"KID's interval needs at least 3 real and 3 generated images ({m}, {n})")
    k_xx, k_yy = polynomial_kernel(real, real), polynomial_kernel(fake, fake)
    k_xy = polynomial_kernel(real, fake)
    k_xx.fill_diagonal_(0.0)
    k_yy.fill_diagonal_(0.0)
    s_xx, s_yy, s_xy = k_xx.sum(), k_yy.sum(), k_xy.sum()
    kid = s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2.0 * s_xy / (m * n)
    # each image left out in turn: its kernel row drops out of the sums
    without_real = (
        (s_xx - 2.0 * k_xx.sum(1)) / ((m - 1) * (m - 2))
        + s_yy / (n * (n - 1))
        - 2.0 * (s_xy - k_xy.sum(1)) / ((m - 1) * n)
    )
    without_fake = (
        s_xx / (m * (m - 1))
        + (s_yy - 2.0 * k_yy.sum(1)) / ((n - 1) * (n - 2))
        - 2.0 * (s_xy - k_xy.sum(0)) / (m * (n - 1))
    )
    variance = (m - 1) / m * float(((without_real - without_real.mean()) ** 2).sum()) + (
        n - 1
    ) / n * float(((without_fake - without_fake.mean()) ** 2).sum())
    se = math.sqrt(variance)
    z = normal_quantile(level)
    kid = float(kid)
    return {"kid": kid, "kid_se": se, "kid_ci": (kid - z * se, kid + z * se)}


FID_IMAGES_PER_FEATURE = 4  # FID's bias is linear in 1/n only with this many images per dimension


def fid_interval(
    real: Tensor, fake: Tensor, n_resamples: int = 200, seed: int = 0, level: float = 0.95
) -> dict[str, Any]:
    """FID (plug-in, as published) and a bias-corrected FID with a half-sampling interval.

    The plug-in FID is biased upwards by about ``a/n_real + b/n_generated`` (Chong & Forsyth,
    "Effectively Unbiased FID", 2020). Half-samples drawn *without* replacement (⌊n/2⌋ rows of
    each set, ``n_resamples`` seeded draws) have twice that bias, so ``2·FID − mean(FID_half)``
    removes it, and their spread is the delete-d jackknife variance (Shao & Wu 1989; d = n/2),
    plus the Monte Carlo error of the mean. Interval: bias-corrected estimate ± z·SE, clipped
    at 0 together with the estimate (FID ≥ 0), so it always holds the bias-corrected estimate.

    The 1/n bias model holds only when both sets have at least ``FID_IMAGES_PER_FEATURE`` times
    as many images as feature dimensions; below that (e.g. < 8192 images of 2048 Inception
    features) no bias correction and no interval are given, and ``fid_interval_note`` says why.
    """
    real, fake = canonical_order(real).double(), canonical_order(fake).double()
    m, n, dim = len(real), len(fake), int(real.shape[1])
    result: dict[str, Any] = {
        "fid": frechet_distance(real, fake),
        "fid_bias_corrected": None,
        "fid_se": None,
        "fid_ci": None,
        "fid_resamples": n_resamples,
        "seed": seed,
        "level": level,
    }
    needed = FID_IMAGES_PER_FEATURE * dim
    if min(m, n) < needed:
        result["fid_interval_note"] = (
            f"no interval: FID's bias is not 1/n-linear with fewer than {needed} images per set "
            f"({FID_IMAGES_PER_FEATURE} x {dim} features; here {m} real, {n} generated); "
            "compare with the real-vs-real FID at the same n, or use KID's interval"
        )
        return result
    if n_resamples < 2:
        result["fid_interval_note"] = "no interval: evaluate.bootstrap < 2 resamples"
        return result
    rng = np.random.default_rng(seed)
    half_m, half_n = m // 2, n // 2
    halves = np.empty(n_resamples)
    for b in range(n_resamples):
        i = torch.from_numpy(np.sort(rng.choice(m, half_m, replace=False)))
        j = torch.from_numpy(np.sort(rng.choice(n, half_n, replace=False)))
        halves[b] = frechet_distance(real[i], fake[j])
    kept_over_left = (half_m / (m - half_m) + half_n / (n - half_n)) / 2.0
    se = math.sqrt(kept_over_left * halves.var(ddof=1) * (1.0 + 1.0 / n_resamples))
    corrected = 2.0 * result["fid"] - float(halves.mean())
    z = normal_quantile(level)
    result.update(
        fid_bias_corrected=max(corrected, 0.0),
        fid_se=se,
        fid_ci=(max(corrected - z * se, 0.0), max(corrected + z * se, 0.0)),
    )
    return result


def compare_sets(
    real: Tensor,
    fake: Tensor,
    min_images: int,
    n_resamples: int = 200,
    seed: int = 0,
    prdc_k: int = 5,
    level: float = 0.95,
) -> dict[str, Any]:
    """FID (plug-in and bias-corrected with interval), KID with interval and PRDC of two sets.

    The one call for any pair of feature sets (generated vs real, real vs real, base model vs
    real). With fewer than ``min_images`` in either set only the counts and ``withheld`` (the
    reason) are returned: no point estimate that cannot be trusted.
    """
    m, n = len(real), len(fake)
    counts: dict[str, Any] = {"n_real": m, "n_generated": n, "min_images": min_images}
    if min(m, n) < max(min_images, 3):
        return {**counts, "withheld": f"fewer than {max(min_images, 3)} images in a set"}
    k = min(prdc_k, m - 1, n - 1)
    scores = prdc(real, fake, k=k)
    return {
        **counts,
        **fid_interval(real, fake, n_resamples, seed, level),
        **kid_interval(canonical_order(real), canonical_order(fake), level),
        **{name: scores[name] for name in ("precision", "recall", "density", "coverage")},
        "prdc_k": k,
    }
