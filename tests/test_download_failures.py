"""Download stage: malformed metadata, failure threshold, retries, providers, progress."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pandas as pd
import pytest
from s3_server import free_port, moto_s3
from test_download import BUCKET, MATRIX, by_uid, cohort_row, settings

from idc_diffusion.core.progress import Progress, Snapshot, format_line, human_bytes
from idc_diffusion.download import s5cmd
from idc_diffusion.download.report import failed_report_path
from idc_diffusion.download.shard import DownloadFailed, download_shard
from idc_diffusion.download.synthetic import write_synthetic_series

GOOD = [cohort_row(str(i), "CT", 2) for i in range(11, 16)]
ABSENT = cohort_row("19", "CT", 2)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for row in GOOD:
            paths = write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=MATRIX)
            s3.upload_series(BUCKET, row["crdc_series_uuid"], paths)
        yield s3.url


# ------------------------------------------------------------------ malformed metadata

EVIL = [
    cohort_row("21", crdc_series_uuid="x/*' 'https://evil/'\ncp 's3://b/*"),
    cohort_row("22", aws_bucket="Idc_Open;rm -rf ~"),
    cohort_row("23", crdc_series_uuid="00000000-0000-4000-8000-00000000002Z"),
    cohort_row("24", aws_bucket="idc-open-data/../other"),
    cohort_row("25", SeriesInstanceUID="../../escape"),
]


def test_malformed_rows_never_reach_a_manifest(bucket, tmp_path):
    shard_dir = tmp_path / "shard-0"
    rows = pd.DataFrame([GOOD[0], *EVIL])
    report = download_shard(rows, 0, shard_dir, tmp_path / "r.json", settings(bucket))
    entries = by_uid(report)
    assert entries[GOOD[0]["SeriesInstanceUID"]]["status"] == "ok"
    reasons = [entries[row["SeriesInstanceUID"]]["reason"] for row in EVIL]
    assert all(r.startswith("rejected: ") for r in reasons), reasons
    assert "crdc_series_uuid" in reasons[0] and "not a lowercase UUID" in reasons[0]
    assert "aws_bucket 'Idc_Open;rm -rf ~' is not a valid bucket name" in reasons[1]
    assert "crdc_series_uuid" in reasons[2] and "aws_bucket" in reasons[3]
    assert "SeriesInstanceUID '../../escape' is not a UID" in reasons[4]
    assert {entries[row["SeriesInstanceUID"]]["status"] for row in EVIL} == {"missing"}
    manifest = (shard_dir / ".s5cmd" / "attempt-0.txt").read_text()
    assert manifest.splitlines() == [
        f"cp --if-size-differ 's3://{BUCKET}/{GOOD[0]['crdc_series_uuid']}/*' "
        f"'{shard_dir}/.partial/{GOOD[0]['SeriesInstanceUID']}/'"
    ]
    assert not (tmp_path / "escape").exists()


def test_copy_job_refuses_unvalidated_input(tmp_path):
    with pytest.raises(ValueError, match="not a lowercase UUID"):
        s5cmd.CopyJob(BUCKET, "abc/../x", tmp_path)
    with pytest.raises(ValueError, match="not a valid bucket name"):
        s5cmd.CopyJob("a", GOOD[0]["crdc_series_uuid"], tmp_path)
    with pytest.raises(ValueError, match="line break"):
        s5cmd.CopyJob(BUCKET, GOOD[0]["crdc_series_uuid"], tmp_path / "a\nb")


# ------------------------------------------------------------------ failure threshold


def test_too_many_failures_fail_the_shard_after_writing_the_report(bucket, tmp_path):
    rows = pd.DataFrame([*GOOD, ABSENT])  # 1 of 6 fails: 16.7 %
    shard_dir, report_path = tmp_path / "shard-4", tmp_path / "shard-4.json"
    failed_path = tmp_path / "shard-4.failed.json"
    assert failed_report_path(report_path) == failed_path
    with pytest.raises(DownloadFailed) as err:
        download_shard(rows, 4, shard_dir, report_path, settings(bucket, max_failed_fraction=0.1))
    message = str(err.value)
    assert message.startswith("shard 4: 1 of 6 series not ok (16.7% > ")
    assert f"{ABSENT['SeriesInstanceUID']}: missing: " in message and str(failed_path) in message
    assert not report_path.exists()  # the rule's output is absent: the workflow stops
    failed = json.loads(failed_path.read_text())
    assert failed["counts"] == {"ok": 5, "missing": 1, "incomplete": 0, "corrupt": 0}
    assert all((shard_dir / row["SeriesInstanceUID"]).is_dir() for row in GOOD)  # kept

    # a looser threshold passes: downstream gets the ok series, the failed report goes
    report = download_shard(
        rows, 4, shard_dir, report_path, settings(bucket, max_failed_fraction=0.2)
    )
    assert report["counts"]["ok"] == 5 and report_path.exists() and not failed_path.exists()
    assert GOOD[0]["crdc_series_uuid"] not in (shard_dir / ".s5cmd" / "attempt-0.txt").read_text()


def test_cli_exits_nonzero_with_a_summary(bucket, tmp_path):
    cohort = tmp_path / "cohort.parquet"
    pd.DataFrame([GOOD[0], ABSENT]).to_parquet(cohort)
    proc = subprocess.run(
        [sys.executable, "-m", "idc_diffusion", "download", "--settings",
         json.dumps(settings(bucket, max_failed_fraction=0.05)), "--cohort", str(cohort),
         "--shard", "0", "--out-dir", str(tmp_path / "shard-0"),
         "--report", str(tmp_path / "shard-0.json")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert proc.returncode == 3, proc.stderr
    assert "1 of 2 series not ok (50.0% > download.max_failed_fraction 5.0%)" in proc.stderr
    assert not (tmp_path / "shard-0.json").exists()
    assert json.loads((tmp_path / "shard-0.failed.json").read_text())["counts"]["ok"] == 1


# ------------------------------------------------------------------ retries and endpoints


def test_unreachable_endpoint_fails_fast_with_backoff(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens here
    options = settings(url, retries=2, retry_backoff_s=0.3, s5cmd_retry_count=0)
    start = time.monotonic()
    report = download_shard(pd.DataFrame(GOOD[:2]), 0, tmp_path / "s", tmp_path / "r.json", options)
    elapsed = time.monotonic() - start
    assert report["counts"]["missing"] == 2
    assert 0.3 + 0.6 <= elapsed < 20  # two backoffs (0.3 s, 0.6 s), no 90 s s5cmd retries
    logs = tmp_path / "s" / ".s5cmd"
    assert sorted(p.name for p in logs.glob("attempt-*.txt")) == [
        f"attempt-{i}.txt" for i in range(3)
    ]
    assert (logs / "s5cmd.log").read_text().count("--retry-count 0 run") == 3


def test_providers_and_bucket_renames(tmp_path):
    assert s5cmd.resolve_endpoint("aws", None) == "https://s3.amazonaws.com"
    assert s5cmd.resolve_endpoint("gcs", None) == "https://storage.googleapis.com"
    assert s5cmd.resolve_endpoint("custom", "http://mirror:9000") == "http://mirror:9000"
    with pytest.raises(ValueError, match=r"provider: custom needs download\.endpoint_url"):
        s5cmd.resolve_endpoint("custom", None)
    with pytest.raises(ValueError, match="only used with provider: custom"):
        s5cmd.resolve_endpoint("aws", "http://mirror:9000")
    renamed = {b: s5cmd.provider_bucket("gcs", b) for b in s5cmd.GCS_BUCKETS}
    assert renamed == {"idc-open-data-two": "idc-open-idc1", "idc-open-data-cr": "idc-open-cr"}
    assert s5cmd.provider_bucket("gcs", "idc-open-data") == "idc-open-data"
    assert s5cmd.provider_bucket("aws", "idc-open-data-two") == "idc-open-data-two"
    argv = s5cmd.s5cmd_command(tmp_path / "m.txt", "https://storage.googleapis.com", 8, 2)
    assert argv[1:] == [
        "--no-sign-request", "--endpoint-url", "https://storage.googleapis.com",
        "--numworkers", "8", "--retry-count", "2", "run", str(tmp_path / "m.txt"),
    ]  # fmt: skip
    with pytest.raises(ValueError, match="only used with provider: custom"):
        download_shard(pd.DataFrame(GOOD[:1]), 0, tmp_path, tmp_path / "r.json",
                       {"source": "idc", "endpoint_url": "http://x"})  # fmt: skip


# ------------------------------------------------------------------ progress


def test_progress_line_and_thread():
    now = Snapshot(10.0, 3, 8, 25_000_000, 100_000_000)
    before = Snapshot(5.0, 1, 8, 5_000_000, 100_000_000)
    assert format_line("shard 2", now, before) == (
        "shard 2: 3/8 series, 25.0 MB of ~100.0 MB, 2.5 MB/s overall, 4.0 MB/s recent"
    )
    assert human_bytes(999) == "999 B" and human_bytes(2_500_000_000) == "2.5 GB"
    with Progress("shard 0", 2, None, interval_s=0.05) as progress:
        progress.add_bytes(1000)
        time.sleep(0.3)
        progress.series_done(2)
    assert not progress._thread.is_alive()
    assert len(progress.lines) >= 3  # periodic lines plus the final one
    assert progress.lines[0].startswith("shard 0: 0/2 series, 1.0 KB, ")
    assert progress.lines[-1].startswith("shard 0: 2/2 series, 1.0 KB, ")


# ------------------------------------------------------------------ full or read-only disk


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB tmpfs (needs root's CAP_SYS_ADMIN; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def run_cli(url: str, rows: list[dict], out_dir, report, tmp_path) -> subprocess.CompletedProcess:
    cohort = tmp_path / "cohort.parquet"
    pd.DataFrame(rows).to_parquet(cohort)
    return subprocess.run(
        [sys.executable, "-m", "idc_diffusion", "download", "--settings",
         json.dumps(settings(url, retries=0, max_failed_fraction=0.0)), "--cohort", str(cohort),
         "--shard", "0", "--out-dir", str(out_dir), "--report", str(report)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def big_bucket(tmp_path_factory):
    """Three series of two 512 KB instances: more than the 1 MiB disk holds."""
    source = tmp_path_factory.mktemp("big")
    rows = [cohort_row(str(61 + i), "CT", 2) for i in range(3)]
    with moto_s3() as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        for row in rows:
            paths = write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=512)
            s3.upload_series(BUCKET, row["crdc_series_uuid"], paths)
        yield s3.url, rows


def test_disk_full_is_reported_with_its_cause(big_bucket, small_disk, tmp_path):
    url, rows = big_bucket
    proc = run_cli(url, rows, small_disk / "shard-0", small_disk / "shard-0.json", tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == f"full report: {small_disk / 'shard-0.failed.json'}"
    failed = json.loads((small_disk / "shard-0.failed.json").read_text())
    assert failed["counts"]["ok"] == 0
    reasons = [entry["reason"] for entry in failed["series"]]
    assert all(r.startswith("disk full after 2 attempts; ") for r in reasons), reasons
    assert "no space left on device" in (small_disk / "shard-0/.s5cmd/s5cmd.log").read_text()


def test_read_only_output_folder(big_bucket, small_disk, tmp_path):
    url, rows = big_bucket
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    # the shard folder cannot be created: every series says why, the report goes beside
    proc = run_cli(url, rows, small_disk / "shard-0", tmp_path / "shard-0.json", tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = json.loads((tmp_path / "shard-0.failed.json").read_text())
    reasons = {entry["reason"] for entry in failed["series"]}
    assert reasons == {
        f"read-only output folder: [Errno 30] Read-only file system: '{small_disk / 'shard-0'}'"
    }
    # nowhere to write even the report: one line, exit 4
    proc = run_cli(url, rows, small_disk / "shard-0", small_disk / "shard-0.json", tmp_path)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.splitlines()[-1] == (
        "idc-diffusion download: error: Read-only file system "
        f"({small_disk}/shard-0.failed.json.tmp)"
    )
