"""Cohort selection against the real bundled IDC index (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest
import yaml

from idc_diffusion.cohort.download_plan import DiskBudgetError
from idc_diffusion.cohort.filter_sql import CohortSpecError
from idc_diffusion.cohort.idc_index import bundled_index
from idc_diffusion.cohort.selection import EmptyCohortError, build_cohort, run_cohort, select_strata
from idc_diffusion.cohort.splits import patient_keys, shard_of

INDEX = bundled_index()


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, _demo_config: dict) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cohort")
    cfg = _demo_config
    run_cohort(cfg["cohort"], seed=cfg["seed"], n_shards=cfg["n_shards"], out_dir=out)
    return out, cfg


def _index_rows(uids: list[str]) -> pd.DataFrame:
    con = duckdb.connect()
    return con.execute(
        "SELECT * FROM read_parquet(?) WHERE list_contains(?, SeriesInstanceUID)",
        [str(INDEX.series), uids],
    ).df()


def test_every_series_is_in_the_index_with_matching_metadata(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    index = _index_rows(list(cohort["SeriesInstanceUID"]))
    assert len(index) == len(cohort) == cohort["SeriesInstanceUID"].nunique()
    merged = cohort.merge(index, on="SeriesInstanceUID", suffixes=("", "_index"))
    for column in index.columns.drop("SeriesInstanceUID"):
        left, right = merged[column], merged[f"{column}_index"]
        same = (left == right) | (left.isna() & right.isna())
        assert same.all(), column
    assert {"stratum", "split", "shard"} <= set(cohort.columns)


def test_filters_hold(demo_run: tuple[Path, dict]) -> None:
    out, cfg = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    assert cohort["analysis_result_id"].isna().all()
    assert cohort["license_short_name"].isin(cfg["cohort"]["license_allow"]).all()
    species = (
        duckdb.connect()
        .execute("SELECT collection_id, species FROM read_parquet(?)", [str(INDEX.collections)])
        .df()
    )
    assert set(
        species.set_index("collection_id").loc[cohort["collection_id"].unique(), "species"]
    ) == {"Human"}
    for stratum in cfg["cohort"]["strata"]:
        part = cohort[cohort["stratum"] == stratum["name"]]
        assert 0 < len(part) <= stratum["max_series"]
        assert part["Modality"].isin(stratum["modalities"]).all()
        if stratum["body_parts"]:
            assert part["BodyPartExamined"].str.upper().isin(stratum["body_parts"]).all()
        assert (part["instanceCount"] >= stratum["min_instances"]).all()
        if stratum["max_instances"]:
            assert (part["instanceCount"] <= stratum["max_instances"]).all()
        per_patient = patient_keys(part).value_counts().max()
        assert per_patient <= stratum["max_series_per_patient"]


def test_split_is_per_patient_and_shard_is_the_uid_hash(demo_run: tuple[Path, dict]) -> None:
    out, cfg = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    splits_per_patient = cohort.groupby(patient_keys(cohort))["split"].nunique()
    assert (splits_per_patient == 1).all()
    assert set(cohort["split"]) == {"train", "val", "test"}
    expected = [shard_of(u, cfg["n_shards"]) for u in cohort["SeriesInstanceUID"]]
    assert list(cohort["shard"]) == expected


def test_summary_and_citations(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["idc_version"] == 25
    assert summary["total"]["series"] == len(cohort)
    assert sum(s["series"] for s in summary["by_split"].values()) == len(cohort)
    assert sum(summary["by_shard"].values()) == len(cohort)
    assert summary["total"]["size_MB"] == pytest.approx(cohort["series_size_MB"].sum(), abs=1e-3)
    citations = (out / "CITATIONS.md").read_text()
    assert "10.1148/rg.230180" in citations  # IDC itself
    assert "10.1007/s10278-013-9622-7" in citations  # TCIA
    for doi in cohort["source_DOI"].str.lower().unique():
        assert f"https://doi.org/{doi}" in citations
    assert "&amp;" not in citations and "<i>" not in citations


def test_is_deterministic_and_a_larger_cap_selects_a_superset(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    settings["strata"] = [{**settings["strata"][0], "max_series": 3}]
    small = build_cohort(select_strata(INDEX, settings, seed=5), settings["split"], 5, 2)
    again = build_cohort(select_strata(INDEX, settings, seed=5), settings["split"], 5, 2)
    pd.testing.assert_frame_equal(small, again)
    settings["strata"][0]["max_series"] = 9
    large = build_cohort(select_strata(INDEX, settings, seed=5), settings["split"], 5, 2)
    assert set(small["SeriesInstanceUID"]) < set(large["SeriesInstanceUID"])
    other_seed = select_strata(INDEX, settings, seed=6)[0].selected
    assert set(other_seed["SeriesInstanceUID"]) != set(large["SeriesInstanceUID"])


def test_license_filter_reports_what_it_removed(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    settings["strata"] = [
        {
            **settings["strata"][0],
            "collections": ["nsclc_radiomics"],
            "body_parts": [],
            "max_instances": None,
        }
    ]
    with pytest.raises(EmptyCohortError, match=r"nsclc_radiomics|license") as info:
        select_strata(INDEX, settings, seed=1)
    assert "CC BY-NC" in str(info.value)
    settings["license_allow"] = ["CC BY-NC 3.0", "CC BY-NC 4.0"]
    (result,) = select_strata(INDEX, settings, seed=1)
    assert result.removed_by_license == {}
    assert result.matched > len(result.selected) == settings["strata"][0]["max_series"]


def test_filter_matching_nothing_names_the_stratum_and_the_filter(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    settings["strata"][1].update(min_instances=100_000, max_instances=None)
    with pytest.raises(EmptyCohortError) as info:
        select_strata(INDEX, settings, seed=1)
    message = str(info.value)
    assert message.startswith("cohort.strata[brain_mr] selects nothing: no series matched")
    assert "filter 'instance_count' left 0 of 777 series" in message
    assert "body_parts=777, instance_count=0" in message


def test_unknown_values_list_the_closest_valid_ones(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    settings["strata"][0]["body_parts"] = ["CHST", "LUNG"]
    settings["strata"][2]["collections"] = ["nsclc_radiomic"]
    with pytest.raises(CohortSpecError) as info:
        select_strata(INDEX, settings, seed=1)
    message = str(info.value)
    assert "cohort.strata[chest_ct].body_parts: 'CHST' is not in the IDC index" in message
    assert "closest: CHEST," in message
    assert "cohort.strata[chest_radiograph].collections: 'nsclc_radiomic'" in message
    assert "closest: nsclc_radiomics," in message
    assert "LUNG" not in message  # valid values are not reported
    # every collection listed is unknown, so that stratum cannot select anything
    assert "cohort.strata[chest_radiograph] selects nothing: " in message
    assert "cohort.strata[chest_ct] selects nothing" not in message


def test_explain_prints_sql_and_the_count_after_each_filter(
    repo: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from idc_diffusion.cli import main

    out = tmp_path / "cohort"
    assert (
        main(
            [
                "cohort",
                "--config",
                str(repo / "config/demo.yaml"),
                "--explain",
                "--out-dir",
                str(out),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert not out.exists()  # explain writes nothing
    for name in ("chest_ct", "brain_mr", "chest_radiograph"):
        assert f"-- stratum {name}: selection SQL (keys)" in text
    assert text.count("WITH series AS (") == 3
    counts = dict(
        line.split()[1:3]
        for line in text.splitlines()
        if line.startswith("--   ") and line.split()[-1].isdigit() and len(line.split()) == 3
    )
    assert counts["all_series"] == "1044191"
    # chest_radiograph: the non-commercial license filter removes 1164 series
    assert "removed by license: {'CC BY-NC 4.0': 1164}" in text
    chest_ct = text.split("-- stratum chest_ct: series left after each filter")[1]
    lines = [ln.split() for ln in chest_ct.split("-- stratum")[0].splitlines() if ln.strip()]
    values = [int(parts[-1]) for parts in lines]
    assert values == sorted(values, reverse=True)  # each filter only removes
    demo = yaml.safe_load((repo / "config/demo.yaml").read_text())
    assert values[-1] == demo["cohort"]["strata"][0]["max_series"]  # the cap is the last filter


def test_download_plan_and_disk_budget(
    demo_run: tuple[Path, dict], demo_config: dict, tmp_path: Path
) -> None:
    out, cfg = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    plan = json.loads((out / "download_plan.json").read_text())
    assert plan["total"]["files"] == cohort["instanceCount"].sum()
    assert plan["total"]["bytes"] == pytest.approx(cohort["series_size_MB"].sum() * 1e6, abs=2)
    assert [s["shard"] for s in plan["shards"]] == list(range(cfg["n_shards"]))
    for s in plan["shards"]:
        part = cohort[cohort["shard"] == s["shard"]]
        assert (s["series"], s["files"]) == (len(part), part["instanceCount"].sum())
    assert "disk_budget_GB" not in plan  # a gate, not a result: changing it reruns nothing
    settings = demo_config["cohort"]
    settings["disk_budget_GB"] = plan["total"]["bytes"] / 2e9
    with pytest.raises(
        DiskBudgetError,
        match=r"estimated download is 0\.\d+ GB .* over "
        r"cohort\.disk_budget_GB",
    ):
        run_cohort(settings, seed=cfg["seed"], n_shards=cfg["n_shards"], out_dir=tmp_path)
    assert not (tmp_path / "cohort.parquet").exists()
    settings["disk_budget_GB"] = plan["total"]["bytes"] / 1e9 + 1e-6
    run_cohort(settings, seed=cfg["seed"], n_shards=cfg["n_shards"], out_dir=tmp_path)
    assert (tmp_path / "cohort.parquet").exists()


def test_summary_by_modality_and_license(demo_run: tuple[Path, dict]) -> None:
    out, _ = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["backend"] == "duckdb"
    for key, column in (("by_modality", "Modality"), ("by_license", "license_short_name")):
        assert {k: v["series"] for k, v in summary[key].items()} == (
            cohort[column].value_counts().to_dict()
        )
    assert summary["removed_by_license"] == {"CC BY-NC 4.0": 1164}
    for name, part in cohort.groupby("stratum"):
        by_mod = summary["by_stratum"][name]["by_modality"]
        assert {k: v["series"] for k, v in by_mod.items()} == part[
            "Modality"
        ].value_counts().to_dict()


def test_citations_list_every_source_with_collection_license_and_count(
    demo_run: tuple[Path, dict],
) -> None:
    out, _ = demo_run
    cohort = pd.read_parquet(out / "cohort.parquet")
    rows = [
        ln
        for ln in (out / "CITATIONS.md").read_text().splitlines()
        if "https://doi.org/" in ln and ln.startswith("| ")
    ]
    table = {}
    for ln in rows:
        collection, doi, license_, n = [c.strip() for c in ln.strip("|").split("|")]
        table[(collection, doi.removeprefix("https://doi.org/"), license_)] = int(n)
    expected = (
        cohort.assign(doi=cohort["source_DOI"].str.lower())
        .groupby(["collection_id", "doi", "license_short_name"])
        .size()
        .to_dict()
    )
    assert table == expected


def test_a_series_is_in_one_stratum_only(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    first = {**settings["strata"][0], "name": "a", "max_series": 5}
    settings["strata"] = [first, {**first, "name": "b"}]
    a, b = select_strata(INDEX, settings, seed=2)
    assert not set(a.selected["SeriesInstanceUID"]) & set(b.selected["SeriesInstanceUID"])
