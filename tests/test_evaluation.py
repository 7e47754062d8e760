"""The evaluate stage end to end on small fake folders."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from eval_fixtures import blob_image, write_fake_run
from PIL import Image

from idc_diffusion.cli import main
from idc_diffusion.evaluate.evaluation import fill_settings
from idc_diffusion.evaluate.features import RandomConvFeatures
from idc_diffusion.evaluate.report import SECTION_IDS

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
    for block in (metrics, metrics["fid_kid"]):
        assert block["feature_extractor"]["name"] == expected.name
        assert block["feature_extractor"]["weights_sha256"] == expected.weights_sha256
        assert block["feature_extractor"]["is_random"] is True
    assert metrics["counts"] == {
        "generated": 12,
        "prompts": 3,
        "real_test_available": 12,
        "real_test_used": 12,
        "generated_used": 12,
        "train": 30,
    }
    assert metrics["fid_kid"]["fid"] >= 0
    assert metrics["fid_kid"]["kid_subsets"]["kid_subset_size"] == 8
    assert 0 <= metrics["ms_ssim_diversity"]["overall"] <= 1
    assert metrics["heldout_loss"]["base"] == 0.2 and metrics["heldout_loss"]["final"] == 0.15
    assert metrics["heldout_loss"]["relative_improvement"] == pytest.approx(0.25)
    assert metrics["pixel_source"] == ["synthetic"]


def test_confidence_intervals_and_prdc(evaluated) -> None:
    _, metrics = evaluated
    fid = metrics["fid_kid"]
    assert fid["level"] == 0.95 and fid["seed"] == 0 and fid["n_real"] == 12
    # 12 images of 64 features: no valid FID interval, and it says so
    assert fid["fid_ci"] is None and "fewer than 256 images" in fid["fid_interval_note"]
    low, high = fid["kid_ci"]
    assert low < fid["kid"] < high and fid["kid_se"] > 0
    assert fid["kid_subsets"]["kid_std"] > 0
    assert fid["prdc_k"] == 3
    for key in ("precision", "recall", "coverage"):
        assert 0 <= fid[key] <= 1


def test_matched_sets_have_the_same_caption_mix(tmp_path) -> None:
    # 14 test images: captions 0 and 1 have 5, caption 2 has 4; 4 samples per prompt
    run = write_fake_run(tmp_path, n_test=14)
    metrics = _run(run)
    compared = metrics["compared"]
    per = {c["caption"]: c for c in compared["per_caption"]}
    assert [per[c]["used"] for c in sorted(per)] == [4, 4, 4]
    assert compared["n_real"] == compared["n_generated"] == 12
    assert compared["real_left_out"] == 2 and compared["generated_left_out"] == 0
    assert metrics["fid_kid"]["n_real"] == metrics["fid_kid"]["n_generated"] == 12
    html = (run.out_dir / "report.html").read_text()
    assert "12 generated vs 12 real test images" in html


def test_prompts_that_are_no_test_caption_are_compared_unmatched_and_said_so(tmp_path) -> None:
    run = write_fake_run(tmp_path)
    path = run.samples_dir / "manifest.parquet"
    manifest = pd.read_parquet(path)
    manifest.assign(prompt="a grid prompt " + manifest["prompt_index"].astype(str)).to_parquet(path)
    metrics = _run(run)
    assert metrics["compared"]["matched"] is False
    assert metrics["fid_kid"]["n_generated"] == 12 and metrics["fid_kid"]["n_real"] == 12
    assert any(n.startswith("UNMATCHED SETS") for n in metrics["notes"])
    assert "Sets NOT matched by caption" in (run.out_dir / "report.html").read_text()


def test_samples_that_are_the_test_images(tmp_path) -> None:
    """The reviewer's case: every sample is a test image of its prompt's caption. FID is 0,
    KID's interval holds KID, and held-out images are flagged no more than the null allows."""
    run = write_fake_run(tmp_path)
    manifest = pd.read_parquet(run.samples_dir / "manifest.parquet")
    test = [json.loads(line) for line in (run.dataset_dir / "test" / "metadata.jsonl").open()]
    for prompt, rows in manifest.groupby("prompt"):
        same = [t for t in test if t["text"] == prompt]
        for row, entry in zip(rows["file_name"], same, strict=True):
            image = Image.open(run.dataset_dir / "test" / entry["file_name"])
            image.save(run.samples_dir / row)
    metrics = _run(run)
    fid = metrics["fid_kid"]
    assert fid["fid"] == pytest.approx(0.0, abs=1e-6)
    assert fid["kid_ci"][0] <= fid["kid"] <= fid["kid_ci"][1]
    memo = metrics["memorization"]
    # the samples are the null's own images: at most the ones above its 0.99 quantile (none)
    assert memo["n_flagged"] == 0
    assert sorted(memo["sample_similarity"]) == pytest.approx(sorted(memo["null_similarity"]))


def test_too_few_images_withhold_point_estimates(tmp_path) -> None:
    run = write_fake_run(tmp_path)
    metrics = _run(run, {**SETTINGS, "min_group_size": 13})
    fid = metrics["fid_kid"]
    assert fid["n_real"] == 12 and "withheld" in fid
    assert not {"fid", "kid", "precision", "recall"} & set(fid)
    assert all("skipped" in g for g in metrics["subgroups"]["groups"])
    assert "No FID/KID/PRDC: fewer than 13 images" in (run.out_dir / "report.html").read_text()


def test_diversity_beside_the_real_reference(evaluated) -> None:
    _, metrics = evaluated
    div = metrics["ms_ssim_diversity"]
    assert div["prompts_scored"] == 3 and div["real_prompts_scored"] == 3
    for row in div["per_prompt"].values():
        assert row["samples"] == 4 and row["real_samples"] == 4
        assert 0 <= row["mean"] <= 1 and 0 <= row["real_mean"] <= 1
    assert 0 <= div["real_overall"] <= 1


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
    assert memo["n_samples"] == 12 and memo["n_null"] == 12 and memo["quantile"] == 0.99
    assert memo["threshold"] == max(memo["null_similarity"])  # q 0.99 of 12: the largest
    flagged = {p["sample_file"]: p for p in memo["flagged"]}
    assert memo["n_flagged"] == len(flagged) >= 2
    manifest = pd.read_parquet(run.samples_dir / "manifest.parquet")
    for row, train_index in run.copied_train.items():
        pair = flagged[manifest.loc[row, "file_name"]]
        assert pair["train_file"] == f"shard-0_train_{train_index:04d}.png"
        assert pair["similarity"] == pytest.approx(1.0, abs=1e-4)
    shifted = flagged[manifest.loc[5, "file_name"]]
    assert (shifted["shift_y"], shifted["shift_x"]) == (1, -2)
    html = (run.out_dir / "report.html").read_text()
    assert f"{memo['n_flagged']} of 12 samples" in html
    assert f"{memo['n_flagged']} of {memo['n_flagged']} flagged samples shown" in html


def test_report_and_figures(evaluated) -> None:
    run, _ = evaluated
    html = (run.out_dir / "report.html").read_text()
    for section_id in SECTION_IDS:
        assert f'id="{section_id}"' in html
    assert "SYNTHETIC PIXEL DATA" in html and "not comparable to published FID" in html
    assert 'src="http' not in html and "data:image/png;base64," in html
    assert "unsupported transfer syntax" in html
    figures = {p.name for p in (run.out_dir / "figures").glob("*.png")}
    assert {"loss_curve.png", "memorization_pairs.png", "memorization_null.png"} <= figures
    assert "samples_p0000.png" in figures
    assert {"samples_p0001.png", "samples_p0002.png"} <= figures


def test_tolerates_missing_model_files(tmp_path) -> None:
    run = write_fake_run(tmp_path, with_model_files=False, pixel_source="idc", rgb_samples=False)
    allowed = {**SETTINGS["feature_extractor"], "allow_random": True}
    settings = {**SETTINGS, "feature_extractor": allowed, "report_max_prompts": 1}
    metrics = _run(run, {**settings, "max_real_images": 6})
    assert metrics["heldout_loss"]["base"] is None
    assert metrics["counts"]["real_test_used"] == 6  # 2 per caption on each side
    assert metrics["memorization"]["n_null"] == 6
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


def test_random_features_refused_on_real_data(tmp_path) -> None:
    run = write_fake_run(tmp_path, pixel_source="idc")
    with pytest.raises(ValueError, match=r"kind: random .*allow_random: true"):
        _run(run)


def _cli(run) -> int:
    return main(
        [
            "evaluate",
            "--settings",
            json.dumps(SETTINGS),
            "--samples-dir",
            str(run.samples_dir),
            "--dataset-dir",
            str(run.dataset_dir),
            "--model-dir",
            str(run.model_dir),
            "--cohort-dir",
            str(run.cohort_dir),
            "--out-dir",
            str(run.out_dir),
        ]
    )


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _garble(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[60:160] = bytes(100)  # inside the image data: the zlib stream breaks
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "damage", [lambda p: p.write_bytes(b""), _truncate, _garble], ids=["empty", "cut", "garbled"]
)
def test_bad_sample_png_is_one_line_naming_the_file(tmp_path, capsys, damage) -> None:
    run = write_fake_run(tmp_path)
    bad = run.samples_dir / "shard-0" / "p0001_s000002.png"
    damage(bad)
    assert _cli(run) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and "Traceback" not in err[0]
    assert not (run.out_dir / "metrics.json").exists()


def test_sample_of_another_size_is_an_error(tmp_path) -> None:
    run = write_fake_run(tmp_path, rgb_samples=False)
    odd = run.samples_dir / "shard-0" / "p0002_s000001.png"
    Image.fromarray(blob_image(np.random.default_rng(5), size=48)).save(odd)
    with pytest.raises(ValueError, match=rf"{odd}: 48x48 px, but .* 64x64"):
        _run(run)


def test_duplicated_manifest_rows_are_an_error(tmp_path) -> None:
    run = write_fake_run(tmp_path)
    path = run.samples_dir / "manifest.parquet"
    manifest = pd.read_parquet(path)
    pd.concat([manifest, manifest.iloc[[3]]]).to_parquet(path)
    with pytest.raises(ValueError, match=r"manifest\.parquet: 1 duplicated rows .*p0000_s000003"):
        _run(run)


def test_fill_settings_defaults() -> None:
    settings = fill_settings({"feature_extractor": {"seed": 3}, "top_pairs": 2})
    assert settings["feature_extractor"] == {
        "kind": "inception",
        "allow_random": False,
        "seed": 3,
        "path": None,
        "input_size": 299,
        "input_range": None,
        "module": None,
    }
    assert settings["top_pairs"] == 2 and settings["kid_subset_size"] == 50
    assert settings["memorization_quantile"] == 0.99


def test_base_model_samples_get_every_metric_and_adherence(tmp_path) -> None:
    run = write_fake_run(tmp_path)
    from idc_diffusion.evaluate.evaluation import evaluate

    # the "base model" here is the same sample folder: its block must equal the fine-tuned one
    metrics = evaluate(
        SETTINGS, run.samples_dir, run.dataset_dir, run.model_dir, run.cohort_dir, run.out_dir,
        {"run_name": "fake"}, base_samples_dir=run.samples_dir,
    )  # fmt: skip
    base = metrics["base_model"]
    for key in ("compared", "fid_kid", "ms_ssim_diversity", "intensity", "subgroups"):
        assert base[key] == metrics[key], key
    assert base["memorization"] == {k: metrics["memorization"][k] for k in base["memorization"]}
    floor = metrics["real_floor"]  # train side subsampled to the test side's n
    assert (floor["n_real"], floor["n_generated"]) == (12, 12) and floor["kid"] is not None
    assert floor["kid_ci"][0] <= floor["kid"] <= floor["kid_ci"][1]
    adherence = metrics["adherence"]
    assert adherence["main_field"] == adherence["fields"][0] == "modality"
    modality = adherence["by_field"]["modality"]
    assert modality["real_test"]["n"] == 12 and modality["fine_tuned"]["n"] == 12
    assert modality["base"] == modality["fine_tuned"]
    assert sum(map(sum, modality["fine_tuned"]["confusion"])) == 12
    html = (run.out_dir / "report.html").read_text()
    assert "Rows, top to bottom: base model · fine-tuned · real (test)" in html
    assert (run.out_dir / "figures" / "adherence_confusion.png").is_file()
