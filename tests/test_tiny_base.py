"""The tiny base model: its VAE fitted on the train split, frozen and saved with a manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from train_fixtures import settings, write_dataset

from idc_diffusion.cli import main
from idc_diffusion.core.hashing import file_sha256
from idc_diffusion.train.base_model import fetch_base_model
from idc_diffusion.train.latent_cache import encode_moments
from idc_diffusion.train.models import (
    build_tiny_pipeline,
    check_pipeline_folder,
    load_base_pipeline,
)
from idc_diffusion.train.tiny_base import fit_vae, latent_scaling_factor, reconstruction_error
from idc_diffusion.train.train_data import load_images, read_split

FAST = {"steps": 3, "batch_size": 4, "learning_rate": 2e-3, "kl_weight": 1e-4}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train=8, val=2, size=32)


@pytest.fixture(scope="module")
def images(data: Path) -> torch.Tensor:
    return load_images(read_split(data, "train").paths)


def test_fitting_lowers_the_reconstruction_error_and_freezes(images: torch.Tensor) -> None:
    vae = build_tiny_pipeline(seed=0, sample_size=32).vae
    before = reconstruction_error(vae, images)
    losses = fit_vae(vae, images, steps=40, batch_size=4, learning_rate=3e-3, kl_weight=0, seed=0)
    after = reconstruction_error(vae, images)
    assert len(losses) == 40 and losses[-1] < losses[0]
    assert after < 0.5 * before
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())


def test_fitting_is_seeded(images: torch.Tensor) -> None:
    weights = []
    for _ in range(2):
        vae = build_tiny_pipeline(seed=0, sample_size=32).vae
        fit_vae(vae, images, steps=5, batch_size=4, learning_rate=1e-3, kl_weight=1e-4, seed=3)
        weights.append(vae.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_scaling_factor_gives_unit_latent_std(images: torch.Tensor) -> None:
    vae = build_tiny_pipeline(seed=0, sample_size=32).vae
    factor = latent_scaling_factor(vae, images)
    means, _ = encode_moments(vae, images)
    assert float((means * factor).std()) == pytest.approx(1.0, rel=1e-5)


def test_written_base_is_a_pipeline_with_a_true_manifest(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "base_model"
    manifest = fetch_base_model(
        {"base_model": "tiny", "tiny_seed": 1, "tiny_vae": FAST}, out, 32, data
    )
    check_pipeline_folder(out)
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk == manifest and manifest["source"] == "tiny" and manifest["revision"] is None
    assert manifest["kind"] == "tiny" and manifest["resolution"] == 32
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert set(manifest["files"]) == files - {"manifest.json"}
    for name, record in manifest["files"].items():
        assert record == {"size": (out / name).stat().st_size, "sha256": file_sha256(out / name)}
    vae = manifest["tiny_vae"]
    assert vae["steps"] == 3 and vae["train_images"] == 8 and vae["seed"] == 1
    loaded = load_base_pipeline(str(out))
    assert loaded.vae.config.scaling_factor == pytest.approx(vae["scaling_factor"])
    error = reconstruction_error(loaded.vae, load_images(read_split(data, "train").paths))
    assert error == pytest.approx(vae["reconstruction_error_grey_levels"], abs=1e-2)
    # UNet and text encoder stay the seeded random ones
    fresh = build_tiny_pipeline(seed=1, sample_size=32)
    fresh_unet = fresh.unet.state_dict()
    assert all(torch.equal(v, fresh_unet[k]) for k, v in loaded.unet.state_dict().items())


def test_resolution_mismatch_names_the_split(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"train/metadata.jsonl: images are 32 px.*64 px"):
        fetch_base_model({"base_model": "tiny", "tiny_vae": FAST}, tmp_path / "b", 64, data)


def test_training_reads_the_base_folder(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base_model"
    args = ["--dataset-dir", str(data), "--resolution", "32", "--out-dir", str(base)]
    assert main(["base-model", "--settings", json.dumps(settings(tiny_vae=FAST)), *args]) == 0
    from idc_diffusion.train.fine_tune import train

    out = tmp_path / "model"
    train(settings(max_steps=1), data, out, {"run_name": "t"}, base_dir=base)
    saved = json.loads((out / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(
        json.loads((base / "manifest.json").read_text())["tiny_vae"]["scaling_factor"]
    )
