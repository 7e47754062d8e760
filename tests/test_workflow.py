"""The Snakemake workflow end to end on the demo config: DAG, lint, outputs, precise reruns."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pydicom
import pytest
import yaml
from conftest import REPO, snakemake

pytestmark = pytest.mark.workflow


def planned_jobs(workdir: Path, configfile: Path, *targets: str) -> dict[str, int]:
    """Rule -> job count of a dry run (empty when nothing is to be done)."""
    out = snakemake(workdir, *targets, "-n", "--configfile", str(configfile)).stdout
    if "Nothing to be done" in out:
        return {}
    table = out.split("Job stats:")[1].split("total")[0]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def demo_raw() -> dict:
    """The demo config as written (no defaults filled), fresh for each test."""
    return yaml.safe_load((REPO / "config" / "demo.yaml").read_text())


def test_dry_run_lists_every_stage_with_one_job_per_shard(tmp_path: Path, demo_raw: dict) -> None:
    demo_raw["n_shards"] = 3
    demo_raw["sample"]["n_shards"] = 2
    jobs = planned_jobs(tmp_path, write_config(tmp_path / "c.yaml", demo_raw))
    assert jobs == {
        "base_model": 1,
        "cohort": 1,
        "download": 3,
        "prepare": 3,
        "dataset": 1,
        "train": 1,
        "model_card": 1,
        "sample": 2,
        "sample_manifest": 1,
        "sample_base": 2,
        "sample_base_manifest": 1,
        "evaluate": 1,
        "all": 1,
    }


def test_lint_is_clean(tmp_path: Path) -> None:
    result = snakemake(tmp_path, "--lint", "--configfile", str(REPO / "config" / "demo.yaml"))
    assert "Congratulations" in result.stdout + result.stderr


def test_unknown_config_key_fails_before_any_job(tmp_path: Path, demo_raw: dict) -> None:
    demo_raw["prepare"]["windw_presets"] = {}
    result = snakemake(
        tmp_path,
        "--configfile",
        str(write_config(tmp_path / "c.yaml", demo_raw)),
        "-c1",
        check=False,
    )
    assert result.returncode != 0
    assert "'windw_presets' was unexpected" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


def test_demo_writes_every_stage_contract_output(demo_run: Path) -> None:
    results = demo_run / "results"
    cohort = pd.read_parquet(results / "cohort" / "cohort.parquet")
    assert (results / "cohort" / "CITATIONS.md").is_file()
    assert json.loads((results / "cohort" / "summary.json").read_text())["total"]["series"] == len(
        cohort
    )
    n_shards = int(cohort["shard"].max()) + 1
    records = []
    for k in range(n_shards):
        report = json.loads((results / "dicom" / f"shard-{k}.json").read_text())
        assert report["pixel_source"] == "synthetic"
        shard_uids = set(cohort.loc[cohort["shard"] == k, "SeriesInstanceUID"])
        assert {s["SeriesInstanceUID"] for s in report["series"]} == shard_uids
        for series in report["series"]:
            assert series["status"] == "ok", series
            assert (
                len(
                    list((results / "dicom" / f"shard-{k}" / series["SeriesInstanceUID"]).iterdir())
                )
                == series["files"]
            )
        shard_records = pd.read_parquet(results / "dataset" / f"shard-{k}" / "records.parquet")
        assert all(
            (results / "dataset" / f"shard-{k}" / f).is_file() for f in shard_records["file_name"]
        )
        records.append(shard_records)
    records = pd.concat(records)
    assert len(records) > 0
    assert (records["pixel_source"] == "synthetic").all()
    for split in ("train", "val", "test"):
        lines = (results / "dataset" / split / "metadata.jsonl").read_text().splitlines()
        rows = [json.loads(line) for line in lines]
        assert len(rows) == (records["split"] == split).sum()
        assert all((results / "dataset" / split / r["file_name"]).is_file() for r in rows)
    assert (results / "dataset" / "rejected.parquet").is_file()
    for pid in cohort["PatientID"]:
        assert not records["text"].str.contains(pid, regex=False).any()


def test_second_run_does_nothing(demo_run: Path) -> None:
    assert planned_jobs(demo_run, REPO / "config" / "demo.yaml") == {}


def test_reordered_and_reformatted_config_reruns_nothing(demo_run: Path, demo_raw: dict) -> None:
    reordered = dict(reversed(list(demo_raw.items())))
    reordered["prepare"] = dict(reversed(list(demo_raw["prepare"].items())))
    path = demo_run / "reordered.yaml"
    path.write_text(
        "# reformatted\n" + yaml.safe_dump(reordered, sort_keys=True, default_flow_style=True)
    )
    assert planned_jobs(demo_run, path) == {}


def test_windowing_change_reruns_prepare_but_not_cohort_or_download(
    demo_run: Path, demo_raw: dict
) -> None:
    changed = json.loads(json.dumps(demo_raw))
    changed["prepare"]["window_presets"] = {
        "lung": {"center": -550, "width": 1500},
        "mediastinum": {"center": 50, "width": 350},
        "bone": {"center": 400, "width": 1800},
        "brain": {"center": 40, "width": 80},
        "abdomen": {"center": 50, "width": 400},
    }
    jobs = planned_jobs(demo_run, write_config(demo_run / "window.yaml", changed))
    assert jobs.get("prepare") == int(demo_raw["n_shards"])
    assert jobs.get("dataset") == 1
    assert "cohort" not in jobs and "download" not in jobs


def test_imagefolder_view_loads_with_datasets(
    demo_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(demo_run / "hf-home"))
    from datasets import load_dataset

    for split in ("train", "val", "test"):
        folder = demo_run / "results" / "dataset" / split
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        if not rows:
            continue
        loaded = load_dataset("imagefolder", data_dir=str(folder), split="train")
        assert sorted(loaded["text"]) == sorted(r["text"] for r in rows)
        assert loaded[0]["image"].size == (64, 64)


def test_sampling_change_reruns_only_sample_and_evaluate(demo_run: Path, demo_raw: dict) -> None:
    demo_raw["sample"]["guidance_scale"] = 2.5
    jobs = planned_jobs(demo_run, write_config(demo_run / "guidance.yaml", demo_raw))
    assert set(jobs) == {
        "sample",
        "sample_manifest",
        "sample_base",
        "sample_base_manifest",
        "evaluate",
        "all",
    }


def test_training_change_reruns_train_onward(demo_run: Path, demo_raw: dict) -> None:
    demo_raw["train"]["learning_rate"] = 1.0e-4
    jobs = planned_jobs(demo_run, write_config(demo_run / "lr.yaml", demo_raw))
    assert set(jobs) == {"train", "model_card", "sample", "sample_manifest", "evaluate", "all"}


def test_tiny_vae_change_refits_the_base_model_and_what_reads_it(
    demo_run: Path, demo_raw: dict
) -> None:
    demo_raw["train"]["tiny_vae"] = {**demo_raw["train"].get("tiny_vae", {}), "steps": 7}
    jobs = planned_jobs(demo_run, write_config(demo_run / "vae.yaml", demo_raw))
    assert set(jobs) == {
        "base_model",
        "train",
        "model_card",
        "sample",
        "sample_manifest",
        "sample_base",
        "sample_base_manifest",
        "evaluate",
        "all",
    }


def test_demo_trains_samples_and_reports(demo_run: Path) -> None:
    results = demo_run / "results"
    summary = json.loads((results / "model" / "train_summary.json").read_text())
    log_lines = (results / "model" / "train_log.jsonl").read_text().splitlines()
    assert len([json.loads(line) for line in log_lines]) == summary["steps"] > 0
    assert summary["heldout_loss_final"] < 0.8 * summary["heldout_loss_base"]
    manifest = pd.read_parquet(results / "samples" / "manifest.parquet")
    assert len(manifest) > 0
    assert all((results / "samples" / f).is_file() for f in manifest["file_name"])
    test_captions = {
        json.loads(line)["text"]
        for line in (results / "dataset" / "test" / "metadata.jsonl").read_text().splitlines()
    }
    assert set(manifest["prompt"]) <= test_captions
    metrics = json.loads((results / "eval" / "metrics.json").read_text())
    assert metrics["feature_extractor"]["is_random"] is False  # the FID Inception network
    html = (results / "eval" / "report.html").read_text()
    assert f"{summary['heldout_loss_base']:.4g}" in html
    assert f"{summary['heldout_loss_final']:.4g}" in html


def test_fine_tuned_beats_its_base_and_the_report_shows_both(demo_run: Path) -> None:
    results = demo_run / "results"
    metrics = json.loads((results / "eval" / "metrics.json").read_text())
    tuned, base = metrics["fid_kid"], metrics["base_model"]["fid_kid"]
    assert tuned["n_generated"] == base["n_generated"] > 0
    assert tuned["kid"] < base["kid"]
    adherence = metrics["adherence"]
    assert adherence["main_field"] == "modality" and "window" in adherence["fields"]
    for field in ("modality", "window"):
        scores = adherence["by_field"][field]
        assert scores["fine_tuned"]["accuracy"] > scores["base"]["accuracy"], field
    floor = metrics["real_floor"]
    assert floor["n_real"] == floor["n_generated"] == tuned["n_real"]
    html = (results / "eval" / "report.html").read_text()
    assert 'id="comparison"' in html and 'id="adherence"' in html
    assert "Rows, top to bottom: base model · fine-tuned · real (test)" in html
    assert "real test (ceiling)" in html and "Confusion matrices: modality" in html
    assert (results / "eval" / "figures" / "adherence_confusion.png").is_file()
    base_manifest = pd.read_parquet(results / "samples_base" / "manifest.parquet")
    tuned_manifest = pd.read_parquet(results / "samples" / "manifest.parquet")
    pairs = ["prompt", "seed"]
    assert base_manifest[pairs].equals(tuned_manifest[pairs])
    assert set(base_manifest["model_dir"]) == {"results/base_model"}


def test_cohort_filter_change_reruns_everything(demo_run: Path, demo_raw: dict) -> None:
    demo_raw["cohort"]["strata"][0]["max_series"] = 5
    jobs = planned_jobs(demo_run, write_config(demo_run / "cohort.yaml", demo_raw))
    n = int(demo_raw["n_shards"])
    assert jobs == {
        "cohort": 1,
        "download": n,
        "prepare": n,
        "dataset": 1,
        "base_model": 1,
        "train": 1,
        "model_card": 1,
        "sample": 1,
        "sample_manifest": 1,
        "sample_base": 1,
        "sample_base_manifest": 1,
        "evaluate": 1,
        "all": 1,
    }


def test_evaluation_option_reruns_only_evaluate(demo_run: Path, demo_raw: dict) -> None:
    demo_raw["evaluate"]["top_pairs"] = 2
    jobs = planned_jobs(demo_run, write_config(demo_run / "eval.yaml", demo_raw))
    assert set(jobs) == {"evaluate", "all"}


def test_removing_prepared_dicom_reruns_nothing(demo_run: Path) -> None:
    dicom = demo_run / "results" / "dicom"
    archived = demo_run / "archived-shard-0"
    (dicom / "shard-0").rename(archived)
    try:
        assert planned_jobs(demo_run, REPO / "config" / "demo.yaml") == {}
    finally:
        archived.rename(dicom / "shard-0")


DATASET = "results/dataset/summary.json"


@pytest.fixture(scope="module")
def dataset_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo run up to the merged dataset, in a folder of its own (tests change files)."""
    workdir = tmp_path_factory.mktemp("dataset")
    snakemake(workdir, "--configfile", str(REPO / "config" / "demo.yaml"), "-c2", DATASET)
    return workdir


def rerun_downloads(workdir: Path) -> tuple[dict[str, int], list[str]]:
    """Force every download job (they re-verify their shard) up to the dataset: rule -> jobs
    run, and the shards whose prepare ran."""
    out = snakemake(
        workdir, "--configfile", str(REPO / "config" / "demo.yaml"), "-c2", DATASET,
        "--forcerun", "download",
    ).stderr  # fmt: skip
    ran = [m[1] for m in re.finditer(r"Finished jobid: \d+ \(Rule: (\w+)\)", out)]
    shards = re.findall(r"rule prepare:\n(?:.*\n)*?\s+wildcards: shard=(\d+)", out)
    return {rule: ran.count(rule) for rule in set(ran)}, shards


def test_editing_one_dicom_file_reruns_only_its_shard(dataset_run: Path) -> None:
    dicom = dataset_run / "results" / "dicom"
    for path in (dicom / "shard-0").glob("*/*"):
        path.touch()  # a bare touch changes no digest
    report = json.loads((dicom / "shard-1.json").read_text())
    series = next(s for s in report["series"] if s["status"] == "ok")
    target = sorted((dicom / "shard-1" / series["SeriesInstanceUID"]).iterdir())[0]
    dataset = pydicom.dcmread(target)
    dataset.ImageComments = "edited"
    dataset.save_as(target)
    # DICOM files are no inputs: nothing is planned until download re-verifies
    assert planned_jobs(dataset_run, REPO / "config" / "demo.yaml", DATASET) == {}
    ran, shards = rerun_downloads(dataset_run)
    assert ran == {"download": 2, "prepare": 1, "dataset": 1} and shards == ["1"]
    digests = {s["SeriesInstanceUID"]: s["digest"] for s in report["series"]}
    after = json.loads((dicom / "shard-1.json").read_text())["series"]
    changed = [
        s["SeriesInstanceUID"] for s in after if s["digest"] != digests[s["SeriesInstanceUID"]]
    ]
    assert changed == [series["SeriesInstanceUID"]]
    ran, shards = rerun_downloads(dataset_run)  # nothing changed since
    assert ran == {"download": 2} and shards == []


def test_download_setting_reruns_nothing(dataset_run: Path, demo_raw: dict) -> None:
    """A setting that changes how a job runs, not what it writes (tests/test_rerun_matrix.py
    covers every key), reaches the next job that runs and reruns nothing now."""
    demo_raw["download"]["progress_interval_s"] = 3.0
    config = write_config(dataset_run / "progress.yaml", demo_raw)
    result = snakemake(dataset_run, "--configfile", str(config), "-c2", DATASET)
    assert "Nothing to be done" in result.stdout + result.stderr


def test_job_count_grows_with_shards_not_series(tmp_path: Path) -> None:
    real = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    real["train"]["base_model"] = "tiny"  # no hub here; hub ids: tests/test_base_model*.py
    real["n_shards"] = 64
    few = planned_jobs(tmp_path, write_config(tmp_path / "few.yaml", real))
    for stratum in real["cohort"]["strata"]:
        stratum["max_series"] = 10_000
    many = planned_jobs(tmp_path, write_config(tmp_path / "many.yaml", real))
    assert few == many
    assert many["download"] == many["prepare"] == 64
    assert many["sample"] == real["sample"]["n_shards"]


def test_latent_cache_adds_one_job_before_training(tmp_path: Path, demo_raw: dict) -> None:
    demo_raw["prepare"]["latent_cache"] = True
    demo_raw["train"]["use_latent_cache"] = True
    jobs = planned_jobs(tmp_path, write_config(tmp_path / "latents.yaml", demo_raw))
    assert jobs["latents"] == 1 and jobs["train"] == 1


def test_train_reads_the_cache_the_latents_rule_wrote(tmp_path: Path, demo_raw: dict) -> None:
    demo_raw["prepare"]["latent_cache"] = True
    demo_raw["train"].update(use_latent_cache=True, max_steps=4)
    config = write_config(tmp_path / "latents.yaml", demo_raw)
    snakemake(tmp_path, "--configfile", str(config), "-c2", "results/model/train_summary.json")
    index = pd.read_parquet(tmp_path / "results" / "latents" / "index.parquet")
    assert set(index["split"]) == {"train", "val"}  # every split train reads
    summary = json.loads((tmp_path / "results" / "model" / "train_summary.json").read_text())
    assert summary["latent_cache"] == "results/latents"
    assert not (tmp_path / "results" / "model" / "latent_cache").exists()  # nothing rebuilt
    assert (
        "latent cache: results/latents" in (tmp_path / "logs" / "train" / "train.log").read_text()
    )
