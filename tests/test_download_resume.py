"""Download stage: the S3 server dies in the middle of a shard; the rerun completes it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pandas as pd
from s3_server import moto_process
from test_download import BUCKET, by_uid, cohort_row, settings

from idc_diffusion.download import PARTIAL, download_shard
from idc_diffusion.synthetic import write_synthetic_series

N_SERIES, PER_SERIES = 40, 2
ROWS = [cohort_row(str(100 + i), "CT", PER_SERIES) for i in range(N_SERIES)]


def upload_all(s3, source: Path) -> None:
    s3.client.create_bucket(Bucket=BUCKET)
    for row in ROWS:
        s3.upload_series(
            BUCKET, row["crdc_series_uuid"], sorted((source / row["SeriesInstanceUID"]).iterdir())
        )


def complete_partials(shard_dir: Path) -> int:
    """Series folders in .partial holding all their files (s5cmd renames finished files)."""
    folders = (shard_dir / PARTIAL).glob("*/")
    return sum(len(list(f.glob("*.dcm"))) == PER_SERIES for f in folders if f.is_dir())


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_server_killed_mid_shard_then_rerun_completes(tmp_path):
    source = tmp_path / "source"
    for row in ROWS:
        write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=512)
    shard_dir, report_path = tmp_path / "shard-0", tmp_path / "shard-0.json"
    rows = pd.DataFrame(ROWS)
    with moto_process() as s3:
        upload_all(s3, source)
        options = settings(s3.url, retries=0, s5cmd_workers=1, s5cmd_retry_count=0)
        result: dict = {}
        worker = threading.Thread(
            target=lambda: result.update(download_shard(rows, 0, shard_dir, report_path, options))
        )
        worker.start()
        deadline = time.monotonic() + 60
        while complete_partials(shard_dir) < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        s3.kill()  # mid-shard: the remaining requests are refused
        worker.join(timeout=120)
        assert not worker.is_alive()

        first = by_uid(result)
        ok = {uid for uid, e in first.items() if e["status"] == "ok"}
        bad = set(first) - ok
        assert len(ok) >= 2 and bad, f"server stopped too late: {result['counts']}"
        assert {first[uid]["status"] for uid in bad} <= {"missing", "incomplete", "corrupt"}
        assert all(not (shard_dir / uid).exists() for uid in bad)  # nothing looks complete
        kept = {uid: snapshot(shard_dir / uid) for uid in ok}

        s3.start()  # same port; moto starts empty
        upload_all(s3, source)
        report = download_shard(rows, 0, shard_dir, report_path, options)

    assert report["counts"]["ok"] == N_SERIES
    manifest = (shard_dir / ".s5cmd" / "attempt-0.txt").read_text().splitlines()
    fetched = {line.split("/")[3] for line in manifest}
    assert fetched == {first[uid]["crdc_series_uuid"] for uid in bad}  # only the unverified
    assert {uid: snapshot(shard_dir / uid) for uid in ok} == kept  # verified files untouched
    for row in ROWS:
        assert len(list((shard_dir / row["SeriesInstanceUID"]).iterdir())) == PER_SERIES
