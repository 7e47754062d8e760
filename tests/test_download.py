"""Download stage: verification rules, and s5cmd against moto's S3 server on loopback."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from s3_server import moto_s3

from idc_diffusion.core.progress import human_bytes
from idc_diffusion.download import s5cmd
from idc_diffusion.download.fetch import CHECK_BATCH
from idc_diffusion.download.s5cmd import CopyJob, build_manifest, find_s5cmd
from idc_diffusion.download.shard import download_shard
from idc_diffusion.download.staging import PARTIAL
from idc_diffusion.download.synthetic import write_synthetic_series
from idc_diffusion.download.verify import verify_series

BUCKET = "idc-open-data"
MATRIX = 32


def cohort_row(name: str, modality: str = "CT", count: int = 3, **extra) -> dict:
    uid = f"1.2.826.0.1.3680043.8.498.77.{name}"
    row = {
        "collection_id": "demo",
        "PatientID": f"P-{name}",
        "StudyInstanceUID": uid + ".0",
        "SeriesInstanceUID": uid,
        "Modality": modality,
        "BodyPartExamined": "CHEST",
        "SeriesDescription": f"series {name}",
        "PatientAge": "061Y",
        "PatientSex": "M",
        "StudyDate": "20010203",
        "license_short_name": "CC BY 4.0",
        "source_DOI": "10.7937/demo",
        "aws_bucket": BUCKET,
        "crdc_series_uuid": f"00000000-0000-4000-8000-{int(name):012d}",
        "instanceCount": count,
        "series_size_MB": 0.01,
        "stratum": f"{modality}-CHEST",
        "split": "train",
        "shard": 0,
    }
    row.update(extra)
    return row


def settings(endpoint: str | None = None, source: str = "idc", retries: int = 1, **extra) -> dict:
    """Download settings for a loopback endpoint; failures never stop the shard unless asked."""
    return {
        "source": source,
        "provider": "custom" if endpoint else "aws",
        "endpoint_url": endpoint,
        "s5cmd_workers": 4,
        "s5cmd_retry_count": 1,
        "retries": retries,
        "retry_backoff_s": 0,
        "max_failed_fraction": 1.0,
        "progress_interval_s": 10,
        "synthetic": {"matrix": MATRIX, "seed": 0},
        **extra,
    }


def by_uid(report: dict) -> dict[str, dict]:
    return {entry["SeriesInstanceUID"]: entry for entry in report["series"]}


# ------------------------------------------------------------------ the bucket


GOOD = [cohort_row("1", "CT", 4), cohort_row("2", "MR", 3), cohort_row("3", "CR", 1)]
INCOMPLETE = cohort_row("4", "CT", 3)  # one object deleted from the bucket
ABSENT = cohort_row("5", "CT", 2)  # nothing in the bucket
TRUNCATED = cohort_row("6", "CT", 2)  # one object cut short


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    """moto S3 with GOOD, INCOMPLETE and TRUNCATED uploaded; yields (url, bytes per uid)."""
    source = tmp_path_factory.mktemp("source")
    sizes = {}
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for row in [*GOOD, INCOMPLETE, TRUNCATED]:
            paths = write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=MATRIX)
            keys = s3.upload_series(BUCKET, row["crdc_series_uuid"], paths)
            sizes[row["SeriesInstanceUID"]] = sum(p.stat().st_size for p in paths)
            first = sorted(keys)[0]
            if row is INCOMPLETE:
                s3.client.delete_object(Bucket=BUCKET, Key=first)
            if row is TRUNCATED:
                body = keys[first].read_bytes()[:-100]
                s3.client.put_object(Bucket=BUCKET, Key=first, Body=body, ACL="public-read")
        yield s3.url, sizes


# ------------------------------------------------------------------ downloads


def test_full_shard_ok(bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    url, sizes = bucket
    report_path = tmp_path / "shard-0.json"
    report = download_shard(pd.DataFrame(GOOD), 0, tmp_path / "shard-0", report_path, settings(url))
    assert json.loads(report_path.read_text()) == report
    assert report["source"] == report["pixel_source"] == "idc"
    assert report["counts"] == {"ok": 3, "missing": 0, "incomplete": 0, "corrupt": 0}
    for row in GOOD:
        uid = row["SeriesInstanceUID"]
        entry = by_uid(report)[uid]
        assert entry["files"] == entry["expected_instances"] == row["instanceCount"]
        assert entry["bytes"] == sizes[uid]
        assert entry["crdc_series_uuid"] == row["crdc_series_uuid"]
        folder = tmp_path / "shard-0" / uid
        assert len(list(folder.glob("*.dcm"))) == row["instanceCount"]
    assert report["bytes"] == sum(sizes[r["SeriesInstanceUID"]] for r in GOOD)
    assert not (tmp_path / "shard-0" / ".partial").exists()
    # progress: the final line counts every series and byte fetched
    final = f"shard 0: 3/3 series, {human_bytes(report['bytes'])} of ~"
    assert any(r.getMessage().startswith(final) for r in caplog.records), caplog.text
    assert "--retry-count 1" in (tmp_path / "shard-0" / ".s5cmd" / "s5cmd.log").read_text()


def test_bad_series_are_reported_not_raised(bucket, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    url, _ = bucket
    rows = pd.DataFrame([*GOOD, INCOMPLETE, ABSENT, TRUNCATED])
    shard_dir = tmp_path / "shard-0"
    report = download_shard(rows, 0, shard_dir, tmp_path / "r.json", settings(url, retries=1))
    status = {uid: e["status"] for uid, e in by_uid(report).items()}
    assert [status[r["SeriesInstanceUID"]] for r in GOOD] == ["ok"] * 3
    assert status[INCOMPLETE["SeriesInstanceUID"]] == "incomplete"
    assert by_uid(report)[INCOMPLETE["SeriesInstanceUID"]]["reason"] == "1 of 3 files missing"
    assert status[ABSENT["SeriesInstanceUID"]] == "missing"
    assert status[TRUNCATED["SeriesInstanceUID"]] == "corrupt"
    assert "truncated" in by_uid(report)[TRUNCATED["SeriesInstanceUID"]]["reason"]
    assert "no object found" in caplog.text  # s5cmd's error for ABSENT reaches the log
    assert report["counts"] == {"ok": 3, "missing": 1, "incomplete": 1, "corrupt": 1}
    # nothing that failed looks complete; the retry asked only for the failures
    for row in (INCOMPLETE, ABSENT, TRUNCATED):
        assert not (shard_dir / row["SeriesInstanceUID"]).exists()
    retry = (shard_dir / ".s5cmd" / "attempt-1.txt").read_text()
    assert retry.count("\n") == 3 and GOOD[0]["crdc_series_uuid"] not in retry
    # the retry replaced the truncated file: bytes counted once, as they lie on disk
    final = f"shard 0: 3/6 series, {human_bytes(report['bytes'])} of ~"
    assert any(r.getMessage().startswith(final) for r in caplog.records), caplog.text


def test_rerun_fetches_only_unverified_series(bucket, tmp_path):
    url, _ = bucket
    rows = pd.DataFrame([*GOOD, INCOMPLETE])
    shard_dir = tmp_path / "shard-0"
    first = download_shard(rows, 0, shard_dir, tmp_path / "r.json", settings(url, retries=0))
    kept = shard_dir / GOOD[0]["SeriesInstanceUID"]
    mtimes = {p: p.stat().st_mtime_ns for p in kept.iterdir()}
    stamp = json.loads((shard_dir / ".verified" / f"{kept.name}.json").read_text())["files"]
    assert {name: (size, content) for name, (size, _, content) in stamp.items()} == {
        p.name: (p.stat().st_size, "sha256:" + hashlib.sha256(p.read_bytes()).hexdigest())
        for p in kept.iterdir()
    }
    damaged = shard_dir / GOOD[1]["SeriesInstanceUID"]
    next(damaged.iterdir()).unlink()  # e.g. a user deleted a file: must be fetched again
    rewritten = sorted((shard_dir / GOOD[2]["SeriesInstanceUID"]).iterdir())[0]
    rewritten.write_bytes(b"\0" * rewritten.stat().st_size)  # same size, new content and mtime

    report = download_shard(rows, 0, shard_dir, tmp_path / "r.json", settings(url, retries=0))
    manifest = (shard_dir / ".s5cmd" / "attempt-0.txt").read_text().splitlines()
    wanted = {g["crdc_series_uuid"] for g in (GOOD[1], GOOD[2], INCOMPLETE)}
    assert {line.split("/")[3] for line in manifest} == wanted
    assert {p: p.stat().st_mtime_ns for p in kept.iterdir()} == mtimes
    assert report["counts"]["ok"] == 3
    # the same bytes (kept, or fetched again), the same digest; failed series have none
    assert [s["digest"] for s in report["series"]] == [s["digest"] for s in first["series"]]
    assert (
        len({s["digest"] for s in first["series"][:3]}) == 3
        and first["series"][3]["digest"] is None
    )

    s5cmd_log = (shard_dir / ".s5cmd" / "s5cmd.log").read_text()
    download_shard(pd.DataFrame(GOOD), 0, shard_dir, tmp_path / "r.json", settings(url))
    assert (shard_dir / ".s5cmd" / "s5cmd.log").read_text() == s5cmd_log  # s5cmd not run


# ------------------------------------------------------------------ synthetic source, setup


def test_synthetic_source(tmp_path):
    rows = pd.DataFrame([*GOOD, ABSENT])
    shard_dir = tmp_path / "shard-2"
    report = download_shard(rows, 2, shard_dir, tmp_path / "r.json", settings(source="synthetic"))
    assert report["shard"] == 2 and report["pixel_source"] == "synthetic"
    assert report["counts"]["ok"] == 4
    again = download_shard(rows, 2, shard_dir, tmp_path / "r.json", settings(source="synthetic"))
    assert again == report


def test_empty_shard_writes_empty_report(tmp_path):
    report = download_shard(pd.DataFrame(), 1, tmp_path / "s", tmp_path / "r.json", settings())
    assert report == json.loads((tmp_path / "r.json").read_text())
    assert report["series"] == [] and report["bytes"] == 0
    assert set(report["counts"].values()) == {0}


def test_setup_errors_raise(tmp_path, monkeypatch):
    rows = pd.DataFrame(GOOD[:1])
    with pytest.raises(ValueError, match=r"download\.source"):
        download_shard(rows, 0, tmp_path / "s", tmp_path / "r.json", settings(source="tcia"))
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setattr(s5cmd, "packaged_s5cmd", lambda: None)  # as if the wheel were absent
    with pytest.raises(FileNotFoundError, match="s5cmd"):
        download_shard(rows, 0, tmp_path / "s", tmp_path / "r.json", settings())


def test_s5cmd_binary_and_manifest(tmp_path):
    assert find_s5cmd().is_file()
    uuid = "0a1b2c3d-0000-4000-8000-00000000abcd"
    text = build_manifest([CopyJob("idc-open-data", uuid, tmp_path / "it's")])
    assert text == f"cp --if-size-differ 's3://idc-open-data/{uuid}/*' '{tmp_path}/it'\\''s/'\n"


# ------------------------------------------------------------------ verify_series


@pytest.fixture
def series(tmp_path) -> tuple[Path, dict]:
    row = cohort_row("9", "CT", 4)
    folder = tmp_path / row["SeriesInstanceUID"]
    write_synthetic_series(row, folder, matrix=MATRIX)
    return folder, row


def check(folder: Path, row: dict):
    return verify_series(folder, row["SeriesInstanceUID"], row["instanceCount"])


def test_verify_ok(series):
    folder, row = series
    result = check(folder, row)
    assert (result.status, result.files) == ("ok", 4)
    assert result.bytes == sum(p.stat().st_size for p in folder.iterdir())


def test_verify_missing_and_incomplete(series, tmp_path):
    folder, row = series
    assert check(tmp_path / "nowhere", row).status == "missing"
    sorted(folder.iterdir())[0].unlink()
    result = check(folder, row)
    assert (result.status, result.reason) == ("incomplete", "1 of 4 files missing")
    more = write_synthetic_series(dict(row, instanceCount=6), folder.parent / "more", matrix=MATRIX)
    for path in more[4:]:  # two more instances of the series: too many
        shutil.copy(path, folder / path.name)
    result = check(folder, row)
    assert (result.status, result.reason) == ("incomplete", "5 files, expected 4")


def test_verify_counts_distinct_instances(series):
    """One instance under two keys and another missing: as many files as expected, not ok."""
    folder, row = series
    first, second = sorted(folder.iterdir())[:2]
    sop = str(pydicom.dcmread(first, stop_before_pixels=True).SOPInstanceUID)
    second.unlink()
    shutil.copy(first, folder / "copy.dcm")
    result = check(folder, row)
    assert (result.status, result.files) == ("corrupt", 4)
    assert result.reason == (
        f"SOPInstanceUID {sop} is in both {first.name} and copy.dcm: "
        "4 files hold 3 distinct instances, expected 4"
    )


def test_verify_not_dicom(series):
    folder, row = series
    (folder / "IM_0003.dcm").write_text("<html>Access Denied</html>")
    result = check(folder, row)
    assert result.status == "corrupt"
    assert result.reason.startswith("IM_0003.dcm: not a DICOM file (")


@pytest.mark.parametrize("keep", [-100, 600])  # inside the pixel data; inside the header
def test_verify_truncated(series, keep):
    folder, row = series
    victim = sorted(folder.iterdir())[1]
    victim.write_bytes(victim.read_bytes()[:keep])
    result = check(folder, row)
    assert result.status == "corrupt"
    assert result.reason.startswith(victim.name + ":") and "truncated" in result.reason


def test_verify_wrong_series(series):
    folder, row = series
    result = verify_series(folder, "1.2.4", row["instanceCount"])
    assert result.status == "corrupt"
    assert f"SeriesInstanceUID {row['SeriesInstanceUID']} != expected 1.2.4" in result.reason
    assert "(+3 more bad files)" in result.reason


def test_more_objects_than_instances_is_not_promoted(tmp_path):
    """The index says CHECK_BATCH instances, the bucket holds one more: the series may be
    promoted when the first batch completes it, but the extra object (landed or failed to
    land in the moved folder) demotes it again, and no retry promotes it."""
    count = CHECK_BATCH
    row = cohort_row("7", "CT", count)
    paths = write_synthetic_series(dict(row, instanceCount=count + 1), tmp_path / "src", matrix=8)
    shard_dir = tmp_path / "shard-0"
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        s3.upload_series(BUCKET, row["crdc_series_uuid"], paths)
        report = download_shard(
            pd.DataFrame([row]), 0, shard_dir, tmp_path / "r.json", settings(s3.url, retries=1)
        )
    entry = by_uid(report)[row["SeriesInstanceUID"]]
    assert entry["status"] == "incomplete"
    assert entry["reason"] in (
        f"{count + 1} files, expected {count}",
        f"the bucket holds more objects than the index's {count} instances",
    )
    assert not (shard_dir / row["SeriesInstanceUID"]).exists()
    assert not (shard_dir / ".verified" / f"{row['SeriesInstanceUID']}.json").exists()
    assert len(list((shard_dir / PARTIAL / row["SeriesInstanceUID"]).glob("*.dcm"))) >= count
