"""The evaluate stage end to end on small fake folders."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from eval_fixtures import write_fake_run

from idc_diffusion.evaluation import fill_settings
from idc_diffusion.features import RandomConvFeatures
from idc_diffusion.report import SECTION_IDS

SETTINGS = {
    "feature_extractor": {"kind": "random", "seed": 0},
    "kid_subset_size": 8,
    "bootstrap": 30,
    "prdc_k": 3,
    "min_group_size": 4,
}


def _run(run, settings=SETTINGS) -> dict:
    return run.evaluate(settings)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    run = write_fake_run(tmp_path_factory.mktemp("eval"))
    return run, _run(run)


def test_metrics_json(evaluated) -> None:
    run, metrics = evaluated
    on_disk = json.loads((run.out_dir / "metrics.json").read_text())
    assert on_disk == metrics
    expected = RandomConvFeatures(seed=0)
    for block in (metrics, metrics["fid_kid"], metrics["memorization"]):
        assert block["feature_extractor"]["name"] == expected.name
        assert block["feature_extractor"]["weights_sha256"] == expected.weights_sha256
        assert block["feature_extractor"]["is_random"] is True
    assert metrics["counts"] == {
        "generated": 12,
        "prompts": 3,
        "real_test_available": 12,
        "real_test_used": 12,
        "train": 30,
    }
    assert metrics["fid_kid"]["fid"] >= 0 and metrics["fid_kid"]["kid_subset_size"] == 8
    assert 0 <= metrics["ms_ssim_diversity"]["overall"] <= 1
    assert metrics["heldout_loss"]["base"] == 0.2 and metrics["heldout_loss"]["final"] == 0.15
    assert metrics["heldout_loss"]["relative_improvement"] == pytest.approx(0.25)
    assert metrics["pixel_source"] == ["synthetic"]


def test_confidence_intervals_and_prdc(evaluated) -> None:
    _, metrics = evaluated
    fid = metrics["fid_kid"]
    boot = fid["bootstrap"]
    assert boot["n_resamples"] == 30 and boot["seed"] == 0 and boot["level"] == 0.95
    assert boot["fid_ci"][0] < boot["fid_ci"][1] and boot["fid_std"] > 0
    assert boot["kid_ci"][0] < boot["kid_ci"][1]
    assert fid["kid_std"] > 0  # KID's subset std
    fidelity = metrics["prdc"]
    assert fidelity["k"] == 3 and fidelity["n_real"] == 12 and fidelity["n_generated"] == 12
    for key in ("precision", "recall", "coverage"):
        assert 0 <= fidelity[key] <= 1
    assert fidelity["feature_extractor"]["is_random"] is True


def test_intensity_and_subgroups(evaluated) -> None:
    _, metrics = evaluated
    groups = {g["group"]: g for g in metrics["intensity"]["groups"]}
    assert set(groups) == {"CT / lung", "MR / —", "radiograph / —"}
    assert all(g["n_real"] == 4 and g["n_generated"] == 4 for g in groups.values())
    assert all(
        0 <= g["wasserstein_1"] < 1 and 0 <= g["jensen_shannon"] <= 1 for g in groups.values()
    )
    assert metrics["intensity"]["unmatched_generated"] == 0
    rows = {(g["field"], g["value"]): g for g in metrics["subgroups"]["groups"]}
    assert metrics["subgroups"]["min_group_size"] == 4
    assert rows[("body_part", "chest")]["n_real"] == 8 and "fid" in rows[("body_part", "chest")]
    assert rows[("modality", "CT")]["n_generated"] == 4 and "fid" in rows[("modality", "CT")]
    assert ("sex", None) not in rows and rows[("sex", "male")]["n_real"] == 4


def test_training_view(evaluated) -> None:
    run, metrics = evaluated
    assert metrics["validation"] == {
        "heldout_loss": [{"step": 20, "heldout_loss": 0.18}, {"step": 40, "heldout_loss": 0.16}],
        "grids": [20, 40],
    }
    html = (run.out_dir / "report.html").read_text()
    assert "step 20" in html and "step 40" in html
    assert "No validation grids" not in html


def test_memorization_finds_copies(evaluated) -> None:
    run, metrics = evaluated
    memo = metrics["memorization"]
    assert memo["n_samples"] == 12 and memo["n_flagged"] >= 2
    flagged = {p["sample_file"]: p for p in memo["top_pairs"] if p["flagged"]}
    manifest = pd.read_parquet(run.samples_dir / "manifest.parquet")
    for row, train_index in run.copied_train.items():
        pair = flagged[manifest.loc[row, "file_name"]]
        assert pair["train_file_by_ssim"] == f"shard-0_train_{train_index:04d}.png"
        assert pair["ssim"] == pytest.approx(1.0, abs=1e-3)


def test_report_and_figures(evaluated) -> None:
    run, _ = evaluated
    html = (run.out_dir / "report.html").read_text()
    for section_id in SECTION_IDS:
        assert f'id="{section_id}"' in html
    assert "SYNTHETIC PIXEL DATA" in html and "not comparable to published FID" in html
    assert 'src="http' not in html and "data:image/png;base64," in html
    assert "unsupported transfer syntax" in html
    figures = {p.name for p in (run.out_dir / "figures").glob("*.png")}
    assert {"loss_curve.png", "memorization_pairs.png", "samples_p0000.png"} <= figures
    assert {"samples_p0001.png", "samples_p0002.png"} <= figures


def test_tolerates_missing_model_files(tmp_path) -> None:
    run = write_fake_run(tmp_path, with_model_files=False, pixel_source="idc", rgb_samples=False)
    metrics = _run(run, {**SETTINGS, "report_max_prompts": 1, "max_real_images": 5})
    assert metrics["heldout_loss"]["base"] is None
    assert metrics["counts"]["real_test_used"] == 5
    assert any("train_summary.json" in n for n in metrics["notes"])
    html = (run.out_dir / "report.html").read_text()
    assert "SYNTHETIC PIXEL DATA" not in html
    assert not (run.out_dir / "figures" / "loss_curve.png").exists()
    assert not (run.out_dir / "figures" / "samples_p0001.png").exists()
    assert "No validation grids" in html and metrics["validation"]["heldout_loss"] == []


def test_clear_errors(tmp_path) -> None:
    run = write_fake_run(tmp_path)
    manifest = pd.read_parquet(run.samples_dir / "manifest.parquet")
    manifest.iloc[:0].to_parquet(run.samples_dir / "manifest.parquet")
    with pytest.raises(ValueError, match=r"manifest\.parquet.*empty"):
        _run(run)
    manifest.to_parquet(run.samples_dir / "manifest.parquet")
    (run.dataset_dir / "test" / "metadata.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"test.metadata\.jsonl: no test images"):
        _run(run)


def test_fill_settings_defaults() -> None:
    settings = fill_settings({"feature_extractor": {"seed": 3}, "top_pairs": 2})
    assert settings["feature_extractor"] == {
        "kind": "random",
        "seed": 3,
        "path": None,
        "input_size": 299,
        "input_range": None,
        "module": None,
    }
    assert settings["top_pairs"] == 2 and settings["kid_subset_size"] == 50


def test_base_model_samples_get_every_metric_and_adherence(tmp_path) -> None:
    run = write_fake_run(tmp_path)
    from idc_diffusion.evaluation import evaluate

    # the "base model" here is the same sample folder: its block must equal the fine-tuned one
    metrics = evaluate(
        SETTINGS, run.samples_dir, run.dataset_dir, run.model_dir, run.cohort_dir, run.out_dir,
        {"run_name": "fake"}, base_samples_dir=run.samples_dir,
    )  # fmt: skip
    base = metrics["base_model"]
    for key in ("fid_kid", "prdc", "ms_ssim_diversity", "intensity", "subgroups", "memorization"):
        assert base[key] == metrics[key], key
    floor = metrics["real_floor"]
    assert (floor["n_real"], floor["n_generated"]) == (12, 30) and floor["kid_mean"] is not None
    adherence = metrics["adherence"]
    assert adherence["main_field"] == adherence["fields"][0] == "modality"
    modality = adherence["by_field"]["modality"]
    assert modality["real_test"]["n"] == 12 and modality["fine_tuned"]["n"] == 12
    assert modality["base"] == modality["fine_tuned"]
    assert sum(map(sum, modality["fine_tuned"]["confusion"])) == 12
    html = (run.out_dir / "report.html").read_text()
    assert "Rows, top to bottom: base model · fine-tuned · real (test)" in html
    assert (run.out_dir / "figures" / "adherence_confusion.png").is_file()
