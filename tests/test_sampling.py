"""Sampling: prompt sets, per-image seeds, shard/batch independence, manifest, DICOM export,
LoRA, bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import yaml
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from idc_diffusion.cli import main
from idc_diffusion.core.config import load_config
from idc_diffusion.sample.dicom_export import read_generation_parameters, to_grayscale
from idc_diffusion.sample.generate import (
    MANIFEST_COLUMNS,
    SCHEDULERS,
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
from idc_diffusion.train.models import ModelError, build_tiny_pipeline

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


def pixel_agreement(a: np.ndarray, b: np.ndarray) -> tuple[int, float]:
    """(largest grey-level difference, fraction of exactly equal values)."""
    diff = np.abs(a.astype(int) - b.astype(int))
    return int(diff.max()), float((diff == 0).mean())


@pytest.mark.parametrize("scheduler", sorted(SCHEDULERS))
def test_every_scheduler_is_batch_invariant(model_dir: Path, scheduler: str) -> None:
    pipe = load_pipeline(model_dir)
    set_scheduler(pipe, scheduler)
    jobs = plan_jobs(CAPTIONS, per_prompt=2, base_seed=3)
    whole = generate(pipe, jobs, steps=4, guidance=4.0)
    by_three = np.concatenate([generate(pipe, jobs[i : i + 3], 4, 4.0) for i in range(0, 8, 3)])
    worst, equal = pixel_agreement(whole, by_three)
    assert worst <= 1 and equal > 0.999
    assert len({img.tobytes() for img in whole}) == len(jobs)


def test_float64_makes_batches_bit_identical(model_dir: Path) -> None:
    pipe = load_pipeline(model_dir, dtype="float64")
    assert pipe.unet.dtype == torch.float64
    jobs = plan_jobs(CAPTIONS, per_prompt=1, base_seed=4)
    batch = generate(pipe, jobs, steps=3, guidance=4.0)
    alone = np.stack([generate(pipe, [j], 3, 4.0)[0] for j in jobs])
    np.testing.assert_array_equal(batch, alone)


def test_pipeline_uses_sdpa_attention_and_float32_on_cpu(model_dir: Path) -> None:
    pipe = load_pipeline(model_dir)
    processors = {**pipe.unet.attn_processors, **pipe.vae.attn_processors}
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    with pytest.raises(ModelError, match="no GPU"):
        if not torch.cuda.is_available():
            load_pipeline(model_dir, device="cuda")
        else:
            raise ModelError("no GPU check possible with a GPU present")


def test_dicom_export_one_series_per_prompt(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    samples = tmp_path / "samples"
    shards = [samples / f"shard-{k}" for k in range(2)]
    for k, out in enumerate(shards):
        part = sample_shard(settings(per_prompt=3, n_shards=2), model_dir, dataset_dir, out, k)
        assert part["dicom_file"].isna().all()  # the sample jobs write no DICOM (no run name)
    # the merge writes them: renaming a run rewrites these files and regenerates no image
    dicom = samples / "dicom"
    manifest = merge_manifests(shards, samples / "manifest.parquet", dicom, run_name="t")
    assert manifest["dicom_file"].notna().all()
    series: dict[str, list[int]] = {}
    for row in manifest.itertuples():
        path = samples / row.dicom_file
        assert path.parent.parent == dicom
        ds = pydicom.dcmread(path)
        png = np.asarray(Image.open(samples / row.file_name))
        np.testing.assert_array_equal(ds.pixel_array, to_grayscale(png))
        assert str(ds.PatientName) == "SYNTHETIC^t"
        params = read_generation_parameters(ds)
        assert (params["prompt"], params["seed"]) == (row.prompt, str(row.seed))
        assert params["model_sha256"] == row.model_sha256
        assert ds.SeriesNumber == row.prompt_index + 1
        series.setdefault(ds.SeriesInstanceUID, []).append(int(ds.InstanceNumber))
        assert path.parent.name == f"p{row.prompt_index:04d}"
        # the k-th seed of its prompt (plan_jobs' order), whichever shard it came from
        k = [image_seed(0, row.prompt, i) for i in range(3)].index(row.seed)
        assert ds.InstanceNumber == k + 1
    assert len(series) == len(CAPTIONS)
    assert all(sorted(numbers) == [1, 2, 3] for numbers in series.values())
    assert len(list(dicom.rglob("*.dcm"))) == len(manifest)
    renamed = merge_manifests(shards, samples / "manifest.parquet", dicom, run_name="u")
    assert len(list(dicom.rglob("*.dcm"))) == len(renamed)  # the folder is replaced
    ds = pydicom.dcmread(samples / renamed["dicom_file"].iloc[0])
    assert str(ds.PatientName) == "SYNTHETIC^u"


def test_dicom_export_off(model_dir: Path, dataset_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "shard-0"
    sample_shard(settings(), model_dir, dataset_dir, out, 0)
    manifest = merge_manifests([out], tmp_path / "manifest.parquet")
    assert manifest["dicom_file"].isna().all() and len(manifest) == 2 * len(CAPTIONS)
    assert not (out / "dicom").exists() and not (tmp_path / "dicom").exists()


def test_a_shard_without_prompts_writes_an_empty_manifest(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    n = 16
    jobs = plan_jobs(sorted(CAPTIONS), 1, 0)
    empty = next(k for k in range(n) if not shard_jobs(jobs, k, n))
    manifest = sample_shard(settings(n_shards=n), model_dir, dataset_dir, tmp_path / "e", empty)
    assert manifest.empty and list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["manifest.parquet"]


def save_lora(model_dir: Path, folder: Path) -> Path:
    """LoRA weights for the tiny UNet with non-zero B matrices, in diffusers' format."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    pipe.unet.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_q", "to_v"])
    )
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=get_peft_model_state_dict(pipe.unet)
    )
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_weights_change_images_and_model_hash(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    lora = save_lora(model_dir, tmp_path / "lora")
    base = sample_shard(settings(per_prompt=1), model_dir, dataset_dir, tmp_path / "a", 0)
    tuned = sample_shard(
        settings(per_prompt=1, model=str(model_dir), lora_weights=str(lora)),
        tmp_path / "unused",
        dataset_dir,
        tmp_path / "b",
        0,
    )
    assert tuned["lora_weights"].eq(str(lora)).all()
    assert tuned["model_sha256"].iloc[0] != base["model_sha256"].iloc[0]
    for a, b in zip(base["file_name"], tuned["file_name"], strict=True):
        worst, _ = pixel_agreement(
            np.asarray(Image.open(tmp_path / "a" / Path(a).name)),
            np.asarray(Image.open(tmp_path / "b" / Path(b).name)),
        )
        assert worst > 1
    # fusing the LoRA into the weights gives what diffusers' unfused LoRA layers give
    from diffusers import StableDiffusionPipeline

    unfused = StableDiffusionPipeline.from_pretrained(model_dir)
    unfused.load_lora_weights(str(lora.parent))
    unfused.set_progress_bar_config(disable=True)
    jobs = plan_jobs(CAPTIONS[:2], per_prompt=1, base_seed=0)
    fused = load_pipeline(model_dir, lora_weights=str(lora))
    worst, _ = pixel_agreement(generate(fused, jobs, 3, 4.0), generate(unfused, jobs, 3, 4.0))
    assert worst <= 1


def test_missing_lora_and_long_negative_prompt_are_refused_before_sampling(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ModelError, match=r"lora_weights: .*nope\.safetensors does not exist"):
        sample_shard(
            settings(lora_weights=str(tmp_path / "nope.safetensors")),
            model_dir,
            dataset_dir,
            tmp_path / "out",
            0,
        )
    with pytest.raises(PromptError, match=r"prompt 4 has \d+ tokens"):
        sample_shard(
            settings(negative_prompt="blurry " * 100), model_dir, dataset_dir, tmp_path / "out", 0
        )
    assert not (tmp_path / "out").exists()


def test_cli_sample_with_a_config_file_and_a_prompt_grid(model_dir: Path, tmp_path: Path) -> None:
    train = tmp_path / "dataset" / "train"
    train.mkdir(parents=True)
    records = [
        {"file_name": "a.png", "text": "x", "modality": "CT", "body_part": "chest",
         "plane": "axial", "window": "lung", "sex": "female"},
        {"file_name": "b.png", "text": "y", "modality": "CT", "body_part": "chest",
         "plane": "axial", "window": "mediastinum", "sex": "male"},
        {"file_name": "c.png", "text": "z", "modality": "CT", "body_part": "chest",
         "plane": "coronal", "window": "lung", "sex": "male"},
    ]  # fmt: skip
    (train / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = load_config("config/demo.yaml")
    config["sample"].update(
        prompts="grid",
        per_prompt=1,
        num_inference_steps=2,
        grid={"split": "train", "fields": ["modality", "body_part", "window"]},
    )
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "samples" / "shard-0"
    argv = ["sample", "--config", str(path), "--model-dir", str(model_dir)]
    argv += ["--dataset-dir", str(tmp_path / "dataset"), "--out-dir", str(out)]
    assert main(argv) == 0
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest["prompt"]) == [
        "CT of the chest, lung window",
        "CT of the chest, mediastinum window",
    ]
    merged = tmp_path / "samples" / "manifest.parquet"
    argv_merge = ["sample-manifest", "--config", str(path), "--shards", str(out)]
    assert main([*argv_merge, "--out", str(merged)]) == 0  # the DICOM export (config's)
    ds = pydicom.dcmread(tmp_path / "samples" / pd.read_parquet(merged)["dicom_file"].iloc[0])
    assert str(ds.PatientName) == f"SYNTHETIC^{config['run_name']}"
    assert main([*argv[:-1], str(tmp_path / "other"), "--caption", "{"]) == 2
    assert not (tmp_path / "other").exists()


def test_manifest_keeps_the_columns_evaluation_reads() -> None:
    first_release = [
        "file_name",
        "prompt",
        "prompt_index",
        "seed",
        "scheduler",
        "num_inference_steps",
        "guidance_scale",
        "negative_prompt",
        "model_dir",
        "model_sha256",
        "shard",
        "seconds",
    ]
    assert MANIFEST_COLUMNS[: len(first_release)] == first_release
    assert MANIFEST_COLUMNS[len(first_release) :] == ["lora_weights", "dicom_file"]


def test_negative_prompt_changes_images_and_is_recorded(
    model_dir: Path, dataset_dir: Path, tmp_path: Path
) -> None:
    pipe = load_pipeline(model_dir)
    jobs = plan_jobs(CAPTIONS[:2], per_prompt=1, base_seed=0)
    plain = generate(pipe, jobs, steps=3, guidance=4.0)
    negative = generate(pipe, jobs, steps=3, guidance=4.0, negative_prompt="bone window")
    assert pixel_agreement(plain, negative)[0] > 1
    manifest = sample_shard(
        settings(per_prompt=1, max_prompts=1, negative_prompt="bone window"),
        model_dir,
        dataset_dir,
        tmp_path / "shard-0",
        0,
    )
    assert manifest["negative_prompt"].eq("bone window").all()
    merged = merge_manifests(
        [tmp_path / "shard-0"], tmp_path / "manifest.parquet", tmp_path / "dicom"
    )
    ds = pydicom.dcmread(tmp_path / merged["dicom_file"].iloc[0])
    assert read_generation_parameters(ds)["negative_prompt"] == "bone window"
