"""Sampling: prompt sets, per-image seeds, shard/batch independence, manifest, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from idc_diffusion.models import ModelError, build_tiny_pipeline
from idc_diffusion.sampling import (
    MANIFEST_COLUMNS,
    PromptError,
    check_prompt_lengths,
    generate,
    image_seed,
    load_pipeline,
    merge_manifests,
    plan_jobs,
    read_prompts,
    sample_shard,
    set_scheduler,
    shard_jobs,
)

CAPTIONS = [
    "CT of the chest, axial slice, lung window",
    "CT of the chest, axial slice, mediastinum window",
    "MR of the brain, axial slice, female",
    "radiograph of the chest, PA view, male, 60-69 years",
]


def settings(**overrides: object) -> dict:
    base = {
        "prompts": "test_captions",
        "max_prompts": 10,
        "per_prompt": 2,
        "negative_prompt": None,
        "batch_size": 3,
        "scheduler": "dpmsolver++",
        "num_inference_steps": 3,
        "guidance_scale": 4.0,
        "seed": 0,
        "n_shards": 1,
    }
    return {**base, **overrides}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("model")
    build_tiny_pipeline(seed=0, sample_size=32).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("dataset")
    (folder / "test").mkdir()
    lines = [{"file_name": f"{i}.png", "text": c} for i, c in enumerate(CAPTIONS + CAPTIONS[:2])]
    (folder / "test" / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return folder


def test_test_captions_are_deduplicated_sorted_and_capped(dataset_dir: Path) -> None:
    assert read_prompts("test_captions", dataset_dir, 10) == sorted(CAPTIONS)
    assert read_prompts("test_captions", dataset_dir, 2) == sorted(CAPTIONS)[:2]


def test_prompt_files(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("a\n\nb\na\n")
    assert read_prompts(str(txt), tmp_path, 10) == ["a", "b"]
    csv = tmp_path / "p.csv"
    pd.DataFrame({"prompt": ["x", "y"], "note": [1, 2]}).to_csv(csv, index=False)
    assert read_prompts(str(csv), tmp_path, 10) == ["x", "y"]


@pytest.mark.parametrize("content", ["", "\n  \n"])
def test_empty_prompt_file_is_refused(tmp_path: Path, content: str) -> None:
    path = tmp_path / "empty.txt"
    path.write_text(content)
    with pytest.raises(PromptError, match=r"no prompts in .*empty\.txt"):
        read_prompts(str(path), tmp_path, 10)


def test_empty_test_split_and_missing_file_are_refused(tmp_path: Path) -> None:
    with pytest.raises(PromptError, match="no prompts"):
        read_prompts("test_captions", tmp_path, 10)
    with pytest.raises(PromptError, match="does not exist"):
        read_prompts(str(tmp_path / "nope.txt"), tmp_path, 10)


def test_prompt_over_the_token_limit_is_refused(model_dir: Path) -> None:
    pipe = load_pipeline(model_dir)
    check_prompt_lengths(CAPTIONS, pipe.tokenizer)
    with pytest.raises(PromptError, match=r"prompt 1 has \d+ tokens, over .* limit of 77"):
        check_prompt_lengths(["ok", "lung " * 200], pipe.tokenizer)


def test_seeds_depend_on_prompt_not_position() -> None:
    jobs = plan_jobs(CAPTIONS, per_prompt=3, base_seed=5)
    assert len(jobs) == 12
    assert len({j.seed for j in jobs}) == 12
    reordered = plan_jobs(list(reversed(CAPTIONS)), per_prompt=3, base_seed=5)
    assert {(j.prompt, j.seed) for j in jobs} == {(j.prompt, j.seed) for j in reordered}
    assert image_seed(5, CAPTIONS[0], 0) != image_seed(6, CAPTIONS[0], 0)


def test_shards_partition_jobs_keeping_prompts_together() -> None:
    jobs = plan_jobs([f"prompt {i}" for i in range(40)], per_prompt=2, base_seed=0)
    parts = [shard_jobs(jobs, k, 3) for k in range(3)]
    assert sorted(j.seed for p in parts for j in p) == sorted(j.seed for j in jobs)
    assert all(parts)
    for part in parts:
        other = {j.prompt for p in parts if p is not part for j in p}
        assert not {j.prompt for j in part} & other


def test_an_image_regenerated_alone_equals_the_batch_one(model_dir: Path) -> None:
    pipe = load_pipeline(model_dir)
    set_scheduler(pipe, "dpmsolver++")
    jobs = plan_jobs(CAPTIONS[:3], per_prompt=1, base_seed=1)
    batch = generate(pipe, jobs, steps=3, guidance=4.0)
    for i, job in enumerate(jobs):
        alone = generate(pipe, [job], steps=3, guidance=4.0)[0]
        assert np.abs(alone.astype(int) - batch[i].astype(int)).max() <= 1
    assert not np.array_equal(batch[0], batch[1])


def test_sample_shards_write_images_and_manifest(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    one = sample_shard(settings(), model_dir, dataset_dir, tmp_path / "one" / "shard-0", 0)
    assert list(one.columns) == MANIFEST_COLUMNS
    assert len(one) == len(CAPTIONS) * 2
    assert one["model_sha256"].nunique() == 1
    split = [
        sample_shard(
            settings(n_shards=2, batch_size=2),
            model_dir,
            dataset_dir,
            tmp_path / "two" / f"shard-{k}",
            k,
        )
        for k in range(2)
    ]
    merged = merge_manifests(
        [tmp_path / "two" / f"shard-{k}" for k in range(2)], tmp_path / "m.parquet"
    )
    assert len(merged) == len(one)
    assert sum(len(s) for s in split) == len(one)
    by_job = {(r.prompt, r.seed): r.file_name for r in one.itertuples()}
    for row in merged.itertuples():
        a = np.asarray(Image.open(tmp_path / "one" / by_job[(row.prompt, row.seed)]), dtype=int)
        b = np.asarray(Image.open(tmp_path / "two" / row.file_name), dtype=int)
        assert np.abs(a - b).max() <= 1, row
    assert (tmp_path / "m.parquet").is_file()


def test_model_folder_missing_a_component_is_refused_before_sampling(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(ModelError, match="vae"):
        sample_shard(settings(), broken, dataset_dir, tmp_path / "out", 0)
    assert not (tmp_path / "out").exists()


def test_merging_no_images_is_an_error(tmp_path: Path) -> None:
    shard = tmp_path / "shard-0"
    shard.mkdir()
    pd.DataFrame(columns=MANIFEST_COLUMNS).to_parquet(shard / "manifest.parquet")
    with pytest.raises(PromptError, match="no images"):
        merge_manifests([shard], tmp_path / "m.parquet")
