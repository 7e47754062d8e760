"""The stage CLI: by-hand use with --config, and clear errors with exit status 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from conftest import REPO


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "idc_diffusion", *args], capture_output=True, text=True
    )


def test_cohort_by_hand_with_a_config_file(tmp_path: Path) -> None:
    result = run_cli(
        "cohort", "--config", str(REPO / "config" / "demo.yaml"), "--out-dir", str(tmp_path)
    )
    assert result.returncode == 0, result.stderr
    cohort = pd.read_parquet(tmp_path / "cohort.parquet")
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    assert set(cohort["shard"]) <= set(range(demo["n_shards"]))
    assert json.loads((tmp_path / "summary.json").read_text())["n_shards"] == demo["n_shards"]


def test_filter_matching_nothing_exits_2_naming_the_stratum(tmp_path: Path) -> None:
    demo = yaml.safe_load((REPO / "config" / "demo.yaml").read_text())
    demo["cohort"]["strata"][0]["collections"] = ["no_such_collection"]
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(demo))
    result = run_cli("cohort", "--config", str(config), "--out-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "cohort.strata[chest_ct] selects nothing" in result.stderr
    assert not (tmp_path / "out" / "cohort.parquet").exists()


def test_settings_without_seed_is_rejected(tmp_path: Path) -> None:
    result = run_cli("cohort", "--settings", "{}", "--out-dir", str(tmp_path))
    assert result.returncode == 2
    assert "--seed is required with --settings" in result.stderr


def test_latents_encode_the_train_and_heldout_splits_once(tmp_path: Path) -> None:
    import torch
    from train_fixtures import settings, write_dataset

    from idc_diffusion.train.latent_cache import cache_fingerprint, cache_problem
    from idc_diffusion.train.models import build_tiny_pipeline
    from idc_diffusion.train.train_data import read_split

    data = write_dataset(tmp_path / "data", train=5, val=2)
    result = run_cli(
        "latents", "--settings", json.dumps(settings()), "--dataset-dir", str(data),
        "--out-dir", str(tmp_path / "latents"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    index = pd.read_parquet(tmp_path / "latents" / "index.parquet")
    assert list(index["split"]) == ["train"] * 5 + ["val"] * 2
    print_ = cache_fingerprint(build_tiny_pipeline(seed=settings()["tiny_seed"]).vae, torch.float32)
    for split in ("train", "val"):
        assert cache_problem(tmp_path / "latents", read_split(data, split), print_, 64) is None
