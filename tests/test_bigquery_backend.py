"""The BigQuery backend against bqemulator on loopback: same spec, same series as DuckDB.

The emulator is seeded with instance-level rows expanded from ~50 real series of the
bundled IDC index (chosen so that every safety filter removes something); the DuckDB
backend reads the same 50 series as a series-level parquet.
"""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from bq_fixtures import PROJECT, client, emulator, instance_rows, seed

from idc_diffusion.cohort.bigquery_backend import SERIES_COLUMNS, BigQueryIndex, series_sql
from idc_diffusion.cohort.filter_sql import BIGQUERY, DUCKDB
from idc_diffusion.cohort.idc_index import bundled_index
from idc_diffusion.cohort.selection import run_cohort, select_strata

INDEX = bundled_index()
DATASET = f"{PROJECT}.idc_test"
CT, MR = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"

# (what it exercises, WHERE over the bundled index, how many series)
PICKS = [
    (
        "chest CT",
        f"Modality = 'CT' AND SOPClassUID = '{CT}' AND upper(BodyPartExamined) "
        "IN ('CHEST', 'LUNG') AND instanceCount BETWEEN 5 AND 30 AND license_short_name = "
        "'CC BY 4.0' AND collection_id = 'nlst'",
        14,
    ),
    (
        "brain MR",
        f"Modality = 'MR' AND SOPClassUID = '{MR}' AND upper(BodyPartExamined) "
        "= 'BRAIN' AND instanceCount BETWEEN 5 AND 30 AND license_short_name LIKE "
        "'CC BY _.0' AND analysis_result_id IS NULL AND collection_id IN "
        "('upenn_gbm', 'vestibular_schwannoma_mc_rc', 'cptac_cm', 'cmb_mml')",
        8,
    ),
    (
        "chest radiographs",
        "Modality IN ('CR', 'DX') AND upper(BodyPartExamined) = 'CHEST' "
        "AND license_short_name = 'CC BY 4.0' AND instanceCount <= 2",
        10,
    ),
    (
        "non-commercial license",
        "Modality IN ('CR', 'DX') AND upper(BodyPartExamined) = 'CHEST' AND "
        "license_short_name LIKE 'CC BY-NC%' AND instanceCount <= 2",
        4,
    ),
    (
        "non-human",
        "Modality IN ('CT', 'MR') AND collection_id IN ('mouse_astrocytoma', "
        "'icdc_glioma') AND instanceCount <= 30",
        4,
    ),
    (
        "non-image SOP class",
        f"Modality = 'CT' AND SOPClassUID <> '{CT}' AND instanceCount <= 30",
        3,
    ),
    (
        "localizer",
        f"Modality = 'CT' AND SOPClassUID = '{CT}' AND upper(BodyPartExamined) = 'CHEST' "
        "AND regexp_matches(SeriesDescription, '(?i)(localizer|scout|topogram)') AND "
        "instanceCount BETWEEN 5 AND 30 AND license_short_name = 'CC BY 4.0'",
        3,
    ),
    (
        "too few instances",
        f"Modality = 'MR' AND SOPClassUID = '{MR}' AND "
        "upper(BodyPartExamined) = 'BRAIN' AND instanceCount < 5",
        3,
    ),
]


def _index_sample() -> pd.DataFrame:
    con = duckdb.connect()
    parts = []
    for _, where, n in PICKS:
        parts.append(
            con.execute(
                f"SELECT * FROM read_parquet(?) WHERE {where} "
                "ORDER BY md5(SeriesInstanceUID) LIMIT ?",
                [str(INDEX.series), n],
            ).df()
        )
    sample = pd.concat(parts, ignore_index=True).drop_duplicates("SeriesInstanceUID")
    # whole bytes, as dicom_all's instance_size sums them
    sample["series_size_MB"] = sample["series_size_MB"].map(
        lambda mb: round(mb * 1_000_000) / 1_000_000
    )
    return sample.reset_index(drop=True)


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, pd.DataFrame, Path]:
    tmp = tmp_path_factory.mktemp("bq")
    sample = _index_sample()
    parquet = tmp / "index_sample.parquet"
    sample.to_parquet(parquet, index=False)
    with emulator(tmp / "bqemulator.log") as endpoint:
        bq = client(endpoint)
        n_instances = seed(bq, DATASET, sample)
        assert n_instances == sample["instanceCount"].sum()
        yield bq, sample, parquet
        bq.close()


def _settings(demo_config: dict, parquet: Path, backend: str) -> dict:
    settings = demo_config["cohort"]
    settings.update(
        backend=backend,
        index_parquet=str(parquet),
        bigquery={"project": PROJECT, "dataset": DATASET},
    )
    chest_ct, brain_mr, radiographs = settings["strata"]
    # body parts the 50-series sample has (the vocabulary check reads index_parquet)
    chest_ct.update(body_parts=["CHEST"])
    brain_mr.update(body_parts=["BRAIN"])
    chest_ct.update(min_instances=5, max_instances=30, max_series=6, max_series_per_patient=2)
    brain_mr.update(min_instances=5, max_instances=30, max_series=4, max_series_per_patient=1)
    radiographs.update(max_series=5, max_series_per_patient=1)
    return settings


def instance_files(sample: pd.DataFrame) -> pd.Series:
    """The ``instance_files`` column the seeded dicom_all rows imply, per sample row."""
    rows, _ = instance_rows(sample)
    files: dict[str, list[str]] = {}
    for r in sorted(rows, key=lambda r: r["crdc_instance_uuid"]):
        entry = f"{r['crdc_instance_uuid']}.dcm {r['instance_size']} {r['instance_hash']}"
        files.setdefault(r["SeriesInstanceUID"], []).append(entry)
    return sample["SeriesInstanceUID"].map(lambda uid: ";".join(files[uid]))


def test_series_aggregation_matches_the_index_rows(seeded: tuple) -> None:
    """Every index column as the index has it; plus each object's name, size and MD5."""
    bq, sample, _ = seeded
    got = BigQueryIndex(DATASET, client=bq).query(series_sql(DATASET) + " ORDER BY 4")
    want = sample.assign(instance_files=instance_files(sample))
    want = want.sort_values("SeriesInstanceUID").reset_index(drop=True)
    assert list(got.columns) == [name for name, _ in SERIES_COLUMNS]
    assert len(got) == len(sample)
    for column in got.columns:
        left, right = got[column].astype(object), want[column].astype(object)
        same = [(a == b) or (pd.isna(a) and pd.isna(b)) for a, b in zip(left, right, strict=True)]
        diff = [(a, b) for a, b, ok in zip(left, right, same, strict=True) if not ok]
        assert not diff, (column, diff)


def test_both_backends_count_the_same_series_after_every_filter(
    seeded: tuple, demo_config: dict
) -> None:
    bq, _, parquet = seeded
    files = bundled_index(parquet)
    local = select_strata(files, _settings(demo_config, parquet, "duckdb"), 3, explain=True)
    settings = _settings(demo_config, parquet, "bigquery")
    remote = select_strata(files, settings, 3, BigQueryIndex(DATASET, client=bq), explain=True)
    for a, b in zip(local, remote, strict=True):
        assert a.step_counts == b.step_counts
        assert a.removed_by_license == b.removed_by_license
        assert list(a.selected["SeriesInstanceUID"]) == list(b.selected["SeriesInstanceUID"])
    # the sample exercises every safety filter: each removes at least one series somewhere
    removed = set()
    for r in local:
        counts = r.step_counts or []
        removed |= {
            name for (name, n), (_, prev) in zip(counts[1:], counts[:-1], strict=True) if n < prev
        }
    assert {
        "image_sop_class",
        "human_only",
        "instance_count",
        "not_localizer_description",
        "license_allow",
    } <= removed


def test_run_cohort_outputs_are_identical_across_backends(
    seeded: tuple, demo_config: dict, tmp_path: Path
) -> None:
    bq, _, parquet = seeded
    run_cohort(_settings(demo_config, parquet, "duckdb"), 3, 2, tmp_path / "duckdb")
    run_cohort(_settings(demo_config, parquet, "bigquery"), 3, 2, tmp_path / "bq", client=bq)
    local = pd.read_parquet(tmp_path / "duckdb" / "cohort.parquet")
    remote = pd.read_parquet(tmp_path / "bq" / "cohort.parquet")
    assert remote["instance_files"].str.len().gt(0).all()  # BigQuery only: checked bytes
    columns = [c for c in remote.columns if c != "instance_files"]
    assert set(columns) <= set(local.columns)
    assert len(local) == len(remote) >= 10
    pd.testing.assert_frame_equal(local[columns], remote[columns], check_dtype=False)
    for name in ("download_plan.json", "CITATIONS.md"):
        assert (tmp_path / "duckdb" / name).read_text() == (tmp_path / "bq" / name).read_text()
    a, b = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("duckdb", "bq"))
    assert (a["backend"], b["backend"]) == ("duckdb", "bigquery")
    for key in ("total", "by_stratum", "by_split", "by_modality", "by_license", "by_shard"):
        assert a[key] == b[key], key
    assert a["removed_by_license"] and a["removed_by_license"] == b["removed_by_license"]


def test_literals_and_md5_keys_agree_across_dialects(seeded: tuple) -> None:
    bq, sample, _ = seeded
    tricky = ["it's", "back\\slash", "(?i)(scout|x\\.y)", "naïve"]
    for dialect, run in ((DUCKDB, lambda q: duckdb.sql(q).fetchall()), (BIGQUERY, None)):
        sql = "SELECT " + ", ".join(dialect.literal(t) for t in tricky)
        row = run(sql)[0] if run else tuple(next(iter(bq.query(sql).result())).values())
        assert list(row) == tricky, dialect.name
    uids = list(sample["SeriesInstanceUID"][:10])
    keys = {}
    for dialect in (DUCKDB, BIGQUERY):
        exprs = [
            dialect.md5_hex(f"CONCAT({dialect.literal('7/s/')}, {dialect.literal(u)})")
            for u in uids
        ]
        sql = "SELECT " + ", ".join(exprs)
        if dialect is DUCKDB:
            keys[dialect.name] = list(duckdb.sql(sql).fetchall()[0])
        else:
            keys[dialect.name] = list(next(iter(bq.query(sql).result())).values())
    assert keys["duckdb"] == keys["bigquery"]
    assert all(len(k) == 32 and k == k.lower() for k in keys["duckdb"])


def test_without_application_default_credentials_the_error_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(
        ValueError, match=r"application-default credentials.*never go in the config"
    ):
        BigQueryIndex("bigquery-public-data.idc_current")
