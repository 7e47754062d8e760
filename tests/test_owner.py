"""The owner lock of an output folder: a live writer stops a second one, a stale lock is
taken over, and the download CLI refuses a folder held by a live process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from idc_diffusion.core.owner import LOCK_NAME, FolderBusy, identity, owned, slurm_job_alive


@pytest.fixture
def live_pid():
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process.pid
    process.kill()
    process.wait()


@pytest.fixture
def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def lock(folder: Path, **owner) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    path.write_text(json.dumps({"slurm_job_id": None, "host": identity()["host"], **owner}))
    return path


def test_lock_held_for_the_block_and_released(tmp_path: Path) -> None:
    with owned(tmp_path / "out"):
        held = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
        assert held == identity()
    assert list((tmp_path / "out").iterdir()) == []


def test_live_owner_stops_a_second_writer(tmp_path: Path, live_pid: int) -> None:
    path = lock(tmp_path, pid=live_pid)
    with pytest.raises(FolderBusy, match=rf"being written by pid {live_pid} on "), owned(tmp_path):
        pass
    assert json.loads(path.read_text())["pid"] == live_pid  # left to its owner


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path: Path, dead_pid: int) -> None:
    path = lock(tmp_path, pid=dead_pid)
    with owned(tmp_path):
        assert json.loads(path.read_text()) == identity()
    assert not path.exists()


def test_lock_from_another_host_without_slurm_counts_as_alive(tmp_path: Path) -> None:
    lock(tmp_path, pid=1, host="elsewhere.invalid")
    with pytest.raises(FolderBusy, match=r"pid 1 on elsewhere\.invalid"), owned(tmp_path):
        pass


def fake_squeue(tmp_path: Path, script: str) -> dict[str, str]:
    """An environment whose `squeue` is a stand-in script (no SLURM cluster in unit tests;
    tests/test_slurm.py runs the real one)."""
    squeue = tmp_path / "bin" / "squeue"
    squeue.parent.mkdir()
    squeue.write_text(f"#!/bin/sh\n{script}\n")
    squeue.chmod(0o755)
    return {"PATH": f"{squeue.parent}:{os.environ['PATH']}"}


def test_slurm_owner_checked_with_squeue(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    env = fake_squeue(
        tmp_path,
        'case "$3" in 41) echo RUNNING;; 42) echo COMPLETED;; '
        '*) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;; esac',
    )
    monkeypatch.setenv("PATH", env["PATH"])
    assert slurm_job_alive("41") is True
    assert slurm_job_alive("42") is False and slurm_job_alive("43") is False
    folder = tmp_path / "out"
    lock(folder, slurm_job_id="41", pid=1, host="node7")
    with pytest.raises(FolderBusy, match=r"SLURM job 41 \(pid 1 on node7\)"), owned(folder):
        pass
    lock(folder, slurm_job_id="43", pid=1, host="node7")
    with owned(folder):
        pass
    monkeypatch.setenv("SLURM_JOB_ID", "41")  # the same job, requeued: its own lock
    lock(folder, slurm_job_id="41", pid=1, host="node7")
    with owned(folder):
        pass


def test_download_cli_stops_on_a_live_owner(tmp_path: Path, live_pid: int) -> None:
    shard_dir = tmp_path / "shard-0"
    lock(shard_dir, pid=live_pid)
    cohort = tmp_path / "cohort.parquet"
    pd.DataFrame({"SeriesInstanceUID": ["1.2.3"], "shard": [0]}).to_parquet(cohort)
    result = subprocess.run(
        [sys.executable, "-m", "idc_diffusion", "download", "--settings",
         json.dumps({"source": "synthetic"}), "--cohort", str(cohort),
         "--shard", "0", "--out-dir", str(shard_dir), "--report", str(tmp_path / "r.json")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert not (tmp_path / "r.json").exists() and not (shard_dir / "1.2.3").exists()
    assert f"is being written by pid {live_pid}" in result.stderr.splitlines()[-1]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_train_cli_lock_is_taken_by_rank_zero_only(
    tmp_path: Path, live_pid: int, rank: str
) -> None:
    out = tmp_path / "model"
    lock(out, pid=live_pid)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "summary.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, "-m", "idc_diffusion", "train", "--settings", "{}", "--run-name", "t",
         "--dataset-dir", str(tmp_path / "data"), "--cohort-dir", str(tmp_path / "cohort"),
         "--out-dir", str(out)],
        capture_output=True, text=True, env={**os.environ, "RANK": rank},
    )  # fmt: skip
    busy = f"is being written by pid {live_pid}" in result.stderr
    assert busy is (rank == "0"), result.stderr  # rank 1 goes on (and fails on the data)
    assert result.returncode != 0 and not (out / "model_index.json").exists()
