"""The latent cache: format, staleness checks, and training on it equals encoding each step."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors import safe_open
from train_fixtures import own_precision, settings, write_dataset

from idc_diffusion.train import latent_cache
from idc_diffusion.train.fine_tune import train
from idc_diffusion.train.models import build_tiny_pipeline
from idc_diffusion.train.train_data import load_images, read_split

PROVENANCE = {"cohort_summary": {"licenses": {"CC BY 4.0": 1}}, "pixel_source": "synthetic"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), train=6, val=2)


def test_writer_format_and_moments(data: Path, tmp_path: Path) -> None:
    vae = build_tiny_pipeline(seed=0).vae
    splits = [read_split(data, "train"), read_split(data, "val")]
    index_path = latent_cache.write_latent_cache(tmp_path / "lat", vae, splits, shard_size=4)
    index = pd.read_parquet(index_path)
    assert list(index.columns) == latent_cache.COLUMNS
    assert list(index["split"]) == ["train"] * 6 + ["val"] * 2
    assert list(index["shard"]) == [0, 0, 0, 0, 1, 1, 2, 2]
    assert list(index["row"]) == [0, 1, 2, 3, 0, 1, 0, 1]
    with safe_open(str(tmp_path / "lat" / "shard-1.safetensors"), framework="pt") as handle:
        assert handle.get_tensor("mean").shape == (2, 4, 8, 8)
        assert handle.metadata()["vae"] == latent_cache.cache_fingerprint(vae, torch.float32)
    cached = latent_cache.CachedLatents(tmp_path / "lat", splits[0], torch.zeros(6, 77))
    with torch.no_grad():
        dist = vae.encode(load_images(splits[0].paths[4:5])).latent_dist
    assert torch.allclose(cached[4]["mean"], dist.mean[0], atol=1e-5)
    assert torch.allclose(cached[4]["std"], dist.std[0], atol=1e-5)
    assert not (tmp_path / "lat.partial").exists()


def test_processes_share_the_encoding_and_write_the_same_cache(data: Path, tmp_path: Path) -> None:
    vae = build_tiny_pipeline(seed=0).vae
    splits = [read_split(data, "train"), read_split(data, "val")]
    latent_cache.write_latent_cache(tmp_path / "one", vae, splits, shard_size=2)
    barrier = threading.Barrier(2, timeout=120)  # two processes, as threads

    def write(rank: int) -> None:
        latent_cache.write_latent_cache(
            tmp_path / "two", vae, splits, shard_size=2, process_index=rank, num_processes=2,
            wait=barrier.wait,
        )  # fmt: skip

    threads = [threading.Thread(target=write, args=(rank,)) for rank in (0, 1)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pd.read_parquet(tmp_path / "two" / "index.parquet").equals(
        pd.read_parquet(tmp_path / "one" / "index.parquet")
    )
    for shard in range(4):  # 6 train + 2 val images in shards of 2
        names = [latent_cache.shard_path(tmp_path / n, shard) for n in ("one", "two")]
        with safe_open(str(names[0]), "pt") as a, safe_open(str(names[1]), "pt") as b:
            assert torch.equal(a.get_tensor("mean"), b.get_tensor("mean"))
            assert a.metadata() == b.metadata()
    assert not (tmp_path / "two.partial").exists()


def test_stale_caches_are_named(data: Path, tmp_path: Path) -> None:
    pipeline = build_tiny_pipeline(seed=0)
    split = read_split(data, "train")
    root = tmp_path / "lat"
    latent_cache.write_latent_cache(root, pipeline.vae, [split])
    print_ = latent_cache.cache_fingerprint(pipeline.vae, torch.float32)
    assert latent_cache.cache_problem(root, split, print_, 64) is None
    other = latent_cache.cache_fingerprint(build_tiny_pipeline(seed=1).vae, torch.float32)
    assert "another VAE" in latent_cache.cache_problem(root, split, other, 64)
    bf16 = latent_cache.cache_fingerprint(pipeline.vae, torch.bfloat16)
    assert "encoding dtype" in latent_cache.cache_problem(root, split, bf16, 64)
    assert "px" in latent_cache.cache_problem(root, split, print_, 128)
    assert "not in the cache" in latent_cache.cache_problem(
        root, read_split(data, "val"), print_, 64
    )
    recaptioned = split.__class__(split.name, split.metadata, split.paths,
                                  ["x"] * len(split), split.pixel_sources)  # fmt: skip
    assert "captions" in latent_cache.cache_problem(root, recaptioned, print_, 64)
    assert "does not exist" in latent_cache.cache_problem(tmp_path / "no", split, print_, 64)


def test_training_on_the_cache_matches_encoding_every_step(data: Path, tmp_path: Path) -> None:
    common = {"max_steps": 4, "train_batch_size": 3}
    plain = train(settings(**common), data, tmp_path / "plain", PROVENANCE)
    shared = tmp_path / "shared"  # as the prepare stage would write it
    pipeline = build_tiny_pipeline(seed=0)
    latent_cache.write_latent_cache(
        shared, pipeline.vae, [read_split(data, "train"), read_split(data, "val")]
    )
    cached = train(
        settings(use_latent_cache=True, **common), data, tmp_path / "cached", PROVENANCE, shared
    )
    assert cached["latent_cache"] == str(shared)
    assert not (tmp_path / "cached" / "latent_cache").exists()
    logs = [
        [
            json.loads(x)["loss"]
            for x in (tmp_path / name / "train_log.jsonl").read_text().split("\n")
            if x
        ]
        for name in ("plain", "cached")
    ]
    assert logs[1] == pytest.approx(logs[0], rel=1e-4)
    assert cached["heldout_loss_final"] == pytest.approx(plain["heldout_loss_final"], rel=1e-4)
    # no usable shared cache: train builds and reuses its own
    train(settings(use_latent_cache=True, **common), data, tmp_path / "own", PROVENANCE, None)
    assert (tmp_path / "own" / "latent_cache" / "index.parquet").is_file()


def test_a_bf16_cache_is_reused_on_resume(data: Path, tmp_path: Path) -> None:
    options = settings(
        use_latent_cache=True, mixed_precision="bf16", lr_scheduler="constant", max_steps=2
    )
    with own_precision():
        train(options, data, tmp_path / "model", PROVENANCE, None)
    index = tmp_path / "model" / "latent_cache" / "index.parquet"
    with safe_open(str(latent_cache.shard_path(index.parent, 0)), "pt") as handle:
        assert handle.metadata()["vae"].endswith("-bfloat16")
    written = index.stat().st_mtime_ns
    with own_precision():
        summary = train({**options, "max_steps": 3}, data, tmp_path / "model", PROVENANCE, None)
    assert summary["latent_cache"] == str(index.parent) and index.stat().st_mtime_ns == written
