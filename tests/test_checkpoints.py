"""Preemption safety: SIGTERM mid-run checkpoints and stops; resume equals a straight run;
a non-finite loss stops naming the step and keeps the last good checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from train_fixtures import settings, write_dataset

from idc_diffusion.cli import main
from idc_diffusion.train.checkpoints import (
    BUDGET_STOP,
    StopSignals,
    TimeBudget,
    list_checkpoints,
    parse_squeue_time,
    slurm_end_time,
)
from idc_diffusion.train.fine_tune import train
from idc_diffusion.train.train_step import NonFiniteLoss

ROOT = Path(__file__).resolve().parents[1]
PROVENANCE = {"cohort_summary": {"licenses": {"CC BY 4.0": 1}}, "pixel_source": "synthetic"}


def log_steps(out: Path) -> list[int]:
    path = out / "train_log.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.strip()]


def test_stop_signals_are_recorded_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert signals.signum == signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) == before


def test_sigterm_mid_run_then_resume_equals_straight_run(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=8, val=2)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "summary.json").write_text(json.dumps({"licenses": {"CC BY 4.0": 1}}))
    # cosine: the LR depends on max_steps, so a wrong resume would show in the weights
    options = {"max_steps": 30, "checkpointing_steps": 1000, "lr_scheduler": "cosine",
               "train_batch_size": 2, "ema_decay": 0.9}  # fmt: skip
    out = tmp_path / "killed"
    command = [
        sys.executable, "-m", "idc_diffusion", "train",
        "--settings", json.dumps(settings(**options)), "--run-name", "t",
        "--dataset-dir", str(data), "--cohort-dir", str(tmp_path / "cohort"),
        "--out-dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while len(log_steps(out)) < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    [(stopped, _, _)] = list_checkpoints(out / "checkpoints")
    assert 3 <= stopped < 30 and log_steps(out) == list(range(1, stopped + 1))
    assert not (out / "model_index.json").exists()

    train(settings(**options), data, out, PROVENANCE)  # resume: auto
    straight = tmp_path / "straight"
    train(settings(**options), data, straight, PROVENANCE)
    assert log_steps(out) == list(range(1, 31))
    want = StableDiffusionPipeline.from_pretrained(straight).unet.state_dict()
    got = StableDiffusionPipeline.from_pretrained(out).unet.state_dict()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
    first = [json.loads(x) for x in (straight / "train_log.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again] == pytest.approx([r["loss"] for r in first], abs=1e-6)


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=4, val=0)
    out = tmp_path / "model"
    options = {"learning_rate": 1e30, "lr_warmup_steps": 0, "checkpointing_steps": 1,
               "checkpoints_total_limit": 10, "max_steps": 20, "heldout_max_images": 0}  # fmt: skip
    with pytest.raises(NonFiniteLoss, match=r"at step (\d+)") as error:
        train(settings(**options), data, out, PROVENANCE)
    step = int(error.value.args[0].split("at step ")[1].split()[0])
    assert 1 < step <= 20
    steps = [s for s, _, _ in list_checkpoints(out / "checkpoints")]
    assert steps == list(range(1, step))  # every step before the bad one, none after
    assert f"checkpoint-{step - 1}" in str(error.value)
    assert log_steps(out) == list(range(1, step))
    assert not (out / "model_index.json").exists()


def test_time_budget_leaves_room_for_the_step_and_the_checkpoint() -> None:
    budget = TimeBudget(end=1000.0, floor=100.0)
    budget.step_took(10.0)
    assert not budget.spent(889.0) and budget.spent(890.0)  # 890 + 10 + 100 = 1000
    budget.checkpoint_took(80.0)  # twice the slowest checkpoint, now above the floor
    assert budget.margin() == 160.0 and budget.spent(830.0) and not budget.spent(829.0)
    assert not TimeBudget(end=None, floor=100.0).spent(1e12)


def test_slurm_end_time_from_the_environment_or_squeue_format() -> None:
    assert slurm_end_time({"SLURM_JOB_END_TIME": "1790000000"}) == 1790000000.0
    assert slurm_end_time({}) is None  # not in a SLURM job
    local = datetime(2026, 11, 30, 14, 5, 0).timestamp()  # squeue prints local time
    assert parse_squeue_time("2026-11-30T14:05:00\n") == local
    assert parse_squeue_time("N/A") is None and parse_squeue_time("NONE") is None


def test_a_spent_time_budget_checkpoints_exits_and_resume_equals_straight_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_dataset(tmp_path / "data", train=8, val=2)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "summary.json").write_text(json.dumps({"licenses": {"CC BY 4.0": 1}}))
    options = settings(max_steps=6, lr_scheduler="cosine", train_batch_size=2,
                       stop_margin_seconds=0)  # fmt: skip
    out = tmp_path / "sliced"
    monkeypatch.setenv("SLURM_JOB_END_TIME", str(int(time.time())))  # the limit is now
    with pytest.raises(SystemExit) as stop:
        main(["train", "--settings", json.dumps(options), "--run-name", "t",
              "--dataset-dir", str(data), "--cohort-dir", str(tmp_path / "cohort"),
              "--out-dir", str(out)])  # fmt: skip
    assert stop.value.code == 128 + BUDGET_STOP  # a failed job: Snakemake's retry resumes
    assert [step for step, _, _ in list_checkpoints(out / "checkpoints")] == [1]
    info = json.loads((out / "checkpoints" / "checkpoint-1" / "checkpoint.json").read_text())
    assert info["stop"] == {"reason": "time budget spent", "exit_code": 142}
    monkeypatch.delenv("SLURM_JOB_END_TIME")
    train(options, data, out, PROVENANCE)
    train(options, data, tmp_path / "straight", PROVENANCE)
    assert log_steps(out) == list(range(1, 7))
    want = StableDiffusionPipeline.from_pretrained(tmp_path / "straight").unet.state_dict()
    got = StableDiffusionPipeline.from_pretrained(out).unet.state_dict()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
