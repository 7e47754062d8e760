"""FID/KID, MS-SSIM diversity and the memorization audit on images with known relations."""

from __future__ import annotations

import importlib.util
import itertools

import numpy as np
import pytest
import torch
from eval_fixtures import blob_tensor, noise_tensor

from idc_diffusion.features import (
    INCEPTION_INSTALL,
    INCEPTION_PACKAGE,
    InceptionFeatures,
    RandomConvFeatures,
)
from idc_diffusion.metrics import (
    bootstrap_fid_kid,
    extract_features,
    fid_kid,
    fid_kid_from_features,
    frechet_distance,
    memorization,
    memorization_summary,
    mmd2_unbiased,
    ms_ssim_config,
    ms_ssim_diversity,
    polynomial_kernel,
    top_pairs,
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


def test_memorization_flags_copies_only(extractor) -> None:
    train = blob_tensor(200, seed=7)
    unrelated = noise_tensor(3, seed=8)
    samples = torch.cat([train[[42]], unrelated, train[[150]]])
    table = memorization(
        samples,
        train,
        extract_features(samples, extractor),
        extract_features(train, extractor),
        threshold=0.95,
        top_k=16,
        ssim_threshold=0.9,
    )
    assert list(table.columns) == [
        "sample_index",
        "nearest_train_by_cosine",
        "cosine",
        "nearest_train_by_ssim",
        "ssim",
        "flagged",
    ]
    for row, index in ((0, 42), (4, 150)):
        assert table.loc[row, "nearest_train_by_cosine"] == index
        assert table.loc[row, "nearest_train_by_ssim"] == index
        assert table.loc[row, "cosine"] == pytest.approx(1.0, abs=1e-6)
        assert table.loc[row, "ssim"] == pytest.approx(1.0, abs=1e-4)
    assert table["flagged"].tolist() == [True, False, False, False, True]
    assert (table.loc[1:3, "ssim"] < 0.2).all() and (table.loc[1:3, "cosine"] < 0.95).all()
    summary = memorization_summary(table, 0.95, 0.9, 16)
    assert summary["n_flagged"] == 2 and summary["fraction_flagged"] == pytest.approx(0.4)
    assert set(top_pairs(table, 2)["sample_index"]) == {0, 4}


def test_memorization_empty_train(extractor) -> None:
    samples = blob_tensor(2, seed=9)
    empty = torch.zeros(0, 1, 64, 64, dtype=torch.uint8)
    feats = extract_features(samples, extractor)
    table = memorization(samples, empty, feats, feats[:0], 0.95, 32)
    assert table.empty
    assert memorization_summary(table, 0.95, 0.9, 32)["fraction_flagged"] is None


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
    boot_a = bootstrap_fid_kid(feats_real, feats_fake, n_resamples=20, seed=1)
    boot_b = bootstrap_fid_kid(feats_real[p_real], feats_fake[p_fake], n_resamples=20, seed=1)
    assert boot_a == boot_b


def test_bootstrap_intervals_bracket_the_estimate_and_are_seeded(real, extractor) -> None:
    feats_real = extract_features(real, extractor)
    feats_fake = extract_features(_noisy(real, 40), extractor)
    point = fid_kid_from_features(feats_real, feats_fake, kid_subset_size=None)
    boot = bootstrap_fid_kid(feats_real, feats_fake, n_resamples=60, seed=0)
    low, high = boot["fid_ci"]
    assert 0 <= low < high and boot["fid_std"] > 0
    assert low <= point["fid"] * 1.5 and high >= point["fid"] * 0.5
    kid_low, kid_high = boot["kid_ci"]
    assert kid_low < point["kid_mean"] < kid_high
    assert boot == bootstrap_fid_kid(feats_real, feats_fake, n_resamples=60, seed=0)
    assert boot != bootstrap_fid_kid(feats_real, feats_fake, n_resamples=60, seed=1)
    assert bootstrap_fid_kid(feats_real, feats_fake, n_resamples=0) == {"n_resamples": 0}


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
