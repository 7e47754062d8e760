"""FID/KID with intervals and MS-SSIM diversity on images and features with known relations."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from eval_fixtures import blob_tensor, noise_tensor

from idc_diffusion.evaluate.features import (
    INCEPTION_INSTALL,
    INCEPTION_PACKAGE,
    InceptionFeatures,
    RandomConvFeatures,
)
from idc_diffusion.evaluate.metrics import (
    compare_sets,
    extract_features,
    fid_interval,
    fid_kid,
    fid_kid_from_features,
    frechet_distance,
    kid_interval,
    mmd2_unbiased,
    ms_ssim_config,
    ms_ssim_diversity,
    polynomial_kernel,
)


@pytest.fixture(scope="module")
def extractor() -> RandomConvFeatures:
    return RandomConvFeatures(seed=0)


@pytest.fixture(scope="module")
def real() -> torch.Tensor:
    return blob_tensor(60, seed=0)


def _noisy(images: torch.Tensor, sigma: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(images.shape, generator=g) * sigma
    return (images.float() + noise).clamp(0, 255).round().to(torch.uint8)


def test_fid_kid_self_is_zero(real, extractor) -> None:
    result = fid_kid(real, real, extractor, kid_subset_size=50, batch_size=16)
    assert result["fid"] == pytest.approx(0.0, abs=1e-8)
    assert abs(result["kid_mean"]) < 1e-4
    assert result["feature_extractor"]["weights_sha256"] == extractor.weights_sha256
    assert result["feature_extractor"]["name"] == extractor.name
    assert result["n_real"] == result["n_generated"] == 60


def test_fid_kid_grow_with_noise(real, extractor) -> None:
    fids, kids = [], []
    for sigma in (0, 15, 40, 90):
        result = fid_kid(real, _noisy(real, sigma), extractor, kid_subset_size=30)
        fids.append(result["fid"])
        kids.append(result["kid_mean"])
    assert all(a < b for a, b in itertools.pairwise(fids)), fids
    assert all(a < b for a, b in itertools.pairwise(kids)), kids
    assert kids[-1] > 10 * abs(kids[0])


def test_fid_matches_closed_form_for_gaussians() -> None:
    # Diagonal Gaussians: FID = |mu1-mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20000, 3)) * [1.0, 2.0, 0.5]
    b = rng.standard_normal((20000, 3)) * [1.5, 1.0, 0.5] + [1.0, 0.0, -0.5]
    expected = 1.0 + 0.25 + (1 + 2.25 - 2 * 1.5) + (4 + 1 - 2 * 2) + 0.0
    result = fid_kid_from_features(torch.from_numpy(a), torch.from_numpy(b), kid_subset_size=100)
    assert result["fid"] == pytest.approx(expected, rel=0.05)
    assert result["kid_subset_size"] == 100


def test_kid_subset_capped_and_too_few_images(extractor) -> None:
    images = blob_tensor(6, seed=3)
    result = fid_kid(images, blob_tensor(5, seed=4), extractor, kid_subset_size=50)
    assert result["kid_subset_size"] == 5
    with pytest.raises(ValueError, match="at least 2"):
        fid_kid(images, images[:1], extractor, kid_subset_size=50)


def test_extract_features_accepts_batches(real, extractor) -> None:
    whole = extract_features(real, extractor, batch_size=7)
    batches = extract_features(iter(real.split(11)), extractor)
    assert torch.allclose(whole, batches)


def test_ms_ssim_config_rules() -> None:
    assert ms_ssim_config(64, 64)["scales"] == 4
    assert ms_ssim_config(512, 512)["scales"] == 5
    cfg = ms_ssim_config(32, 32)
    assert cfg["kernel_size"] == 7 and cfg["scales"] == 3
    assert sum(cfg["betas"]) == pytest.approx(1.0)


def test_ms_ssim_diversity_identical_vs_noise() -> None:
    same = blob_tensor(1, seed=5).repeat(4, 1, 1, 1)
    noise = noise_tensor(4, seed=6, channels=3)
    result = ms_ssim_diversity({"same": same, "noise": noise, "single": same[:1]})
    per = result["per_prompt"]
    assert per["same"]["mean"] == pytest.approx(1.0, abs=1e-4)
    assert per["noise"]["mean"] < 0.3
    assert per["same"]["pairs"] == 6
    assert per["single"]["mean"] is None
    assert result["overall"] == pytest.approx((per["same"]["mean"] + per["noise"]["mean"]) / 2)
    assert result["scales"] == 4 and result["kernel_size"] == 7


@pytest.mark.parametrize("n", [20, 90])  # fewer and more images than feature dimensions (64)
def test_frechet_distance_matches_torchmetrics(real, extractor, n) -> None:
    feats_real = extract_features(blob_tensor(n, seed=5), extractor)
    feats_fake = extract_features(_noisy(blob_tensor(n, seed=6), 30), extractor)
    reference = fid_kid_from_features(feats_real, feats_fake, kid_subset_size=None)["fid"]
    assert frechet_distance(feats_real, feats_fake) == pytest.approx(reference, rel=1e-6)
    assert frechet_distance(feats_real, feats_real) == pytest.approx(0.0, abs=1e-8)


def test_metrics_do_not_depend_on_image_order(real, extractor) -> None:
    fake = _noisy(real, 25)
    feats_real, feats_fake = extract_features(real, extractor), extract_features(fake, extractor)
    g = torch.Generator().manual_seed(3)
    p_real, p_fake = torch.randperm(60, generator=g), torch.randperm(60, generator=g)
    a = fid_kid_from_features(feats_real, feats_fake, kid_subset_size=20)
    b = fid_kid_from_features(feats_real[p_real], feats_fake[p_fake], kid_subset_size=20)
    assert a == b
    low_dim_real, low_dim_fake = feats_real[:, :8], feats_fake[:, :8]  # 60 >= 4 x 8: interval
    one = fid_interval(low_dim_real, low_dim_fake, n_resamples=20, seed=1)
    other = fid_interval(low_dim_real[p_real], low_dim_fake[p_fake], n_resamples=20, seed=1)
    assert one == other and one["fid_ci"] is not None


def _gaussians(rng: np.random.Generator, n: int, dim: int, shift: float) -> tuple:
    """Two sets of ``n`` standard normal rows, the second moved by ``shift`` along axis 0."""
    move = np.zeros(dim)
    move[0] = shift
    x = rng.standard_normal((n, dim))
    return torch.from_numpy(x), torch.from_numpy(rng.standard_normal((n, dim)) + move)


def test_kid_interval_covers_zero_for_one_distribution() -> None:
    """Two sets from one distribution: population KID is 0; the 95% interval covers it in about
    95% of seeded trials (the jackknife is conservative, so a little more is fine)."""
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for _ in range(trials):
        x, y = _gaussians(rng, 40, 8, 0.0)
        result = kid_interval(x, y)
        low, high = result["kid_ci"]
        assert low < result["kid"] < high
        covered += low <= 0.0 <= high
    assert 0.92 <= covered / trials <= 0.995


def test_kid_interval_excludes_zero_for_different_distributions() -> None:
    rng = np.random.default_rng(1)
    x, y = _gaussians(rng, 60, 8, 1.5)
    low, _ = kid_interval(x, y)["kid_ci"]
    assert low > 0


def test_kid_jackknife_matches_brute_force_leave_one_out() -> None:
    rng = np.random.default_rng(2)
    x, y = _gaussians(rng, 7, 3, 0.5)

    def kid(a: torch.Tensor, b: torch.Tensor) -> float:
        return mmd2_unbiased(
            polynomial_kernel(a, a), polynomial_kernel(b, b), polynomial_kernel(a, b)
        )

    drop_x = np.array([kid(x[np.arange(7) != i], y) for i in range(7)])
    drop_y = np.array([kid(x, y[np.arange(7) != j]) for j in range(7)])
    variance = (
        6 / 7 * ((drop_x - drop_x.mean()) ** 2).sum()
        + 6 / 7 * ((drop_y - drop_y.mean()) ** 2).sum()
    )
    result = kid_interval(x, y)
    assert result["kid"] == pytest.approx(kid(x, y), rel=1e-12)
    assert result["kid_se"] == pytest.approx(np.sqrt(variance), rel=1e-9)


def test_fid_interval_covers_the_true_fid() -> None:
    """Known answer: N(0, I) vs N(1.2 e0, I) in 2-d has FID 1.44; the bias-corrected interval
    covers it in about 95% of seeded trials, and holds its own estimate."""
    rng = np.random.default_rng(3)
    trials, covered = 80, 0
    for t in range(trials):
        x, y = _gaussians(rng, 64, 2, 1.2)
        result = fid_interval(x, y, n_resamples=40, seed=t)
        low, high = result["fid_ci"]
        assert low <= result["fid_bias_corrected"] <= high
        covered += low <= 1.44 <= high
    assert 0.88 <= covered / trials <= 1.0


def test_fid_interval_covers_zero_for_one_distribution() -> None:
    rng = np.random.default_rng(4)
    trials, covered = 60, 0
    for t in range(trials):
        x, y = _gaussians(rng, 64, 2, 0.0)
        result = fid_interval(x, y, n_resamples=40, seed=t)
        assert result["fid"] > 0  # the plug-in is biased up
        covered += result["fid_ci"][0] == 0.0
    assert covered / trials >= 0.9


def test_identical_sets_interval_holds_the_estimate() -> None:
    """The reviewer's case: samples are exact copies of the real images."""
    x, _ = _gaussians(np.random.default_rng(5), 64, 2, 0.0)
    result = compare_sets(x, x.clone(), min_images=10, n_resamples=40)
    assert result["fid"] == pytest.approx(0.0, abs=1e-9)
    low, high = result["fid_ci"]
    assert low <= result["fid_bias_corrected"] <= high and low == 0.0
    assert result["kid_ci"][0] <= result["kid"] <= result["kid_ci"][1]
    assert result["precision"] == result["recall"] == 1.0


def test_fid_interval_withheld_below_four_images_per_dimension(real, extractor) -> None:
    feats = extract_features(real, extractor)  # 60 images, 64 features
    result = fid_interval(feats, extract_features(_noisy(real, 40), extractor), n_resamples=10)
    assert result["fid"] > 0 and result["fid_ci"] is None and result["fid_bias_corrected"] is None
    assert "fewer than 256 images per set" in result["fid_interval_note"]


def test_compare_sets_withholds_small_sets() -> None:
    x, y = _gaussians(np.random.default_rng(6), 4, 2, 0.0)
    result = compare_sets(x, y, min_images=5)
    assert result == {
        "n_real": 4,
        "n_generated": 4,
        "min_images": 5,
        "withheld": "fewer than 5 images in a set",
    }


def test_unbiased_mmd_matches_torchmetrics_kid(real, extractor) -> None:
    feats_real = extract_features(real, extractor)
    feats_fake = extract_features(_noisy(real, 40), extractor)
    reference = fid_kid_from_features(feats_real, feats_fake, kid_subset_size=None, kid_subsets=1)
    mmd = mmd2_unbiased(
        polynomial_kernel(feats_real, feats_real),
        polynomial_kernel(feats_fake, feats_fake),
        polynomial_kernel(feats_real, feats_fake),
    )
    assert mmd == pytest.approx(reference["kid_mean"], rel=1e-6)


@pytest.mark.skipif(
    importlib.util.find_spec(INCEPTION_PACKAGE) is None,
    reason=f"FID Inception wheel not installed ({INCEPTION_INSTALL})",
)
def test_properties_hold_with_the_real_fid_inception() -> None:
    """FID(x, x) = 0, FID rises with noise, and order does not matter, with the real network."""
    inception = InceptionFeatures()
    images = blob_tensor(8, seed=11, size=64)
    batch = torch.cat([images, _noisy(images, 20), _noisy(images, 100)])
    clean, mild, heavy = extract_features(batch, inception, batch_size=24).split(8)
    assert clean.shape == (8, 2048)
    assert frechet_distance(clean, clean) == pytest.approx(0.0, abs=1e-6)
    fid_mild, fid_heavy = frechet_distance(clean, mild), frechet_distance(clean, heavy)
    assert 0 < fid_mild < fid_heavy
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(clean[order], mild.flip(0)) == pytest.approx(fid_mild, rel=1e-9)
