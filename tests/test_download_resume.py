"""Download stage: the S3 server dies, or the client is killed, in the middle of a shard;
the rerun completes it, fetching only what had not landed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from s3_server import moto_process
from test_download import BUCKET, by_uid, cohort_row, settings

from idc_diffusion.download.shard import download_shard
from idc_diffusion.download.staging import PARTIAL
from idc_diffusion.download.synthetic import write_synthetic_series

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


def test_series_moved_by_a_shard_count_change_is_linked_not_fetched(tmp_path):
    source = tmp_path / "source"
    for row in ROWS:
        write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=32)
    with moto_process(log_path=tmp_path / "server.log") as s3:
        upload_all(s3, source)
        options = settings(s3.url, retries=0)
        old = download_shard(
            pd.DataFrame(ROWS), 0, tmp_path / "shard-0", tmp_path / "0.json", options
        )
        gets = s3.object_gets()
        assert sum(gets.values()) == N_SERIES * PER_SERIES
        moved = [row["SeriesInstanceUID"] for row in ROWS[::4]]  # now in shard 1
        before = {uid: snapshot(tmp_path / "shard-0" / uid) for uid in moved}
        rows = pd.DataFrame(ROWS[::4])
        new = download_shard(rows, 1, tmp_path / "shard-1", tmp_path / "1.json", options)
        assert s3.object_gets() == gets  # not one more GET
        assert {uid: snapshot(tmp_path / "shard-1" / uid) for uid in moved} == before  # same inodes
        assert new["counts"]["ok"] == len(moved)
        assert [by_uid(new)[uid]["digest"] for uid in moved] == [
            by_uid(old)[uid]["digest"] for uid in moved
        ]
        assert not any((tmp_path / "shard-0" / uid).exists() for uid in moved)  # stale copy gone
        assert not any(
            (tmp_path / "shard-0" / ".verified" / f"{uid}.json").exists() for uid in moved
        )


# ------------------------------------------------------------------ the client is killed

KILL_ROWS = [cohort_row(str(200 + i), "CT", 8) for i in range(10)]
SIGNALS = {
    "SIGKILL": (signal.SIGKILL, False, -signal.SIGKILL),  # s5cmd gets SIGTERM from prctl
    "SIGKILL-with-s5cmd": (signal.SIGKILL, True, -signal.SIGKILL),  # the whole group
    "SIGTERM": (signal.SIGTERM, False, 128 + signal.SIGTERM),  # scancel, SLURM time limit
    "SIGINT": (signal.SIGINT, True, 128 + signal.SIGINT),  # Ctrl-C: the terminal's group
}


def landed_files(shard_dir: Path) -> set[str]:
    """Names of the complete objects in the shard (promoted or in .partial; s5cmd's
    temporary files are not complete)."""
    folders = [*shard_dir.glob("1.*"), *(shard_dir / PARTIAL).glob("1.*")]
    return {p.name for folder in folders for p in folder.glob("*.dcm")}


def s5cmd_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line mentions ``marker`` (the shard folder)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().decode(errors="replace")
            state = (cmdline.parent / "stat").read_text().split(") ")[-1][0]
        except OSError:
            continue
        if marker in text and "s5cmd" in text and state != "Z":
            pids.append(int(cmdline.parent.name))
    return pids


def wait_for(condition, timeout_s: float = 60.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@pytest.mark.parametrize("how", list(SIGNALS))
def test_client_killed_mid_shard_rerun_fetches_only_the_rest(tmp_path, how):
    """Kill the download CLI once a third of a 10-series shard has landed and a series has
    been promoted; the rerun GETs exactly the objects that had not landed (counted at the
    server), and every series ends ok."""
    sig, whole_group, exit_code = SIGNALS[how]
    source, shard_dir = tmp_path / "source", tmp_path / "shard-0"
    cohort, log = tmp_path / "cohort.parquet", tmp_path / "download.log"
    pd.DataFrame(KILL_ROWS).to_parquet(cohort)
    total = sum(row["instanceCount"] for row in KILL_ROWS)
    with moto_process(log_path=tmp_path / "server.log") as s3:
        s3.client.create_bucket(Bucket=BUCKET)
        keys = {}
        for row in KILL_ROWS:
            paths = write_synthetic_series(row, source / row["SeriesInstanceUID"], matrix=512)
            keys.update(s3.upload_series(BUCKET, row["crdc_series_uuid"], paths))
        options = settings(s3.url, retries=0, s5cmd_workers=2, progress_interval_s=0.02)
        argv = [
            sys.executable, "-m", "idc_diffusion", "download", "--settings",
            json.dumps(options), "--cohort", str(cohort), "--shard", "0",
            "--out-dir", str(shard_dir), "--report", str(tmp_path / "shard-0.json"),
        ]  # fmt: skip
        with log.open("w") as out:
            client = subprocess.Popen(argv, stderr=out, start_new_session=True)

        def a_third_and_a_series() -> bool:
            progress = re.findall(r"shard 0: (\d+)/10 series", log.read_text())
            return len(landed_files(shard_dir)) >= total / 3 and any(int(n) for n in progress)

        assert wait_for(a_third_and_a_series), log.read_text()
        if whole_group:
            os.killpg(client.pid, sig)
        else:
            os.kill(client.pid, sig)
        assert client.wait(60) == exit_code
        assert wait_for(lambda: not s5cmd_processes(str(shard_dir)), 30)  # s5cmd stopped too
        stderr = log.read_text()
        if sig != signal.SIGKILL:  # one line, no traceback
            assert "Traceback" not in stderr
            name = signal.Signals(sig).name
            assert stderr.splitlines()[-1] == (
                f"idc-diffusion download: interrupted by {name}; rerun to resume"
            )
        before = landed_files(shard_dir)
        assert len(before) < total, "the shard finished before the kill"
        served = s3.object_gets()

        subprocess.run(argv, check=True, capture_output=True)
        refetched = s3.object_gets() - served

    report = json.loads((tmp_path / "shard-0.json").read_text())
    assert report["counts"]["ok"] == len(KILL_ROWS)
    names = {key.split("/")[-1]: f"{BUCKET}/{key}" for key in keys}
    assert set(refetched) == {names[n] for n in set(names) - before}  # only what was missing
    assert set(refetched.values()) == {1}  # each once
