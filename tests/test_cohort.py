"""Cohort selection against the real bundled IDC index (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest

from idc_diffusion.cohort import EmptyCohortError, build_cohort, run_cohort, select_strata
from idc_diffusion.idc_index import bundled_index
from idc_diffusion.splits import patient_keys, shard_of

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


def test_filter_matching_nothing_names_the_stratum(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    settings["strata"][1]["body_parts"] = ["NO_SUCH_PART"]
    with pytest.raises(EmptyCohortError, match=r"cohort\.strata\[brain_mr\].*no series matched"):
        select_strata(INDEX, settings, seed=1)


def test_a_series_is_in_one_stratum_only(demo_config: dict) -> None:
    settings = demo_config["cohort"]
    first = {**settings["strata"][0], "name": "a", "max_series": 5}
    settings["strata"] = [first, {**first, "name": "b"}]
    a, b = select_strata(INDEX, settings, seed=2)
    assert not set(a.selected["SeriesInstanceUID"]) & set(b.selected["SeriesInstanceUID"])
