"""Two-process DDP training on CPU (gloo), started by the train rule's own launcher."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from train_fixtures import settings, write_dataset

from idc_diffusion.train.fine_tune import train
from idc_diffusion.train.launch import launch_command

ROOT = Path(__file__).resolve().parents[1]


def launch(data: Path, cohort: Path, out: Path, max_steps: int) -> dict:
    options = settings(
        max_steps=max_steps, train_batch_size=2, checkpointing_steps=2, ema_decay=0.9
    )
    # what rules/train.smk runs for gpu: 0, train_cpu_processes: 2 (accelerate on a free port)
    command = launch_command(0, cpu_processes=2) + " " + shlex.join([
        "train", "--settings", json.dumps(options), "--run-name", "ddp",
        "--dataset-dir", str(data), "--cohort-dir", str(cohort), "--out-dir", str(out),
    ])  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # fmt: skip
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads((out / "train_summary.json").read_text())


def test_ddp_resume_equals_straight_run(tmp_path: Path) -> None:
    data = write_dataset(tmp_path / "data", train=8, val=2)
    (tmp_path / "cohort").mkdir()
    (tmp_path / "cohort" / "summary.json").write_text("{}")
    summary = launch(data, tmp_path / "cohort", tmp_path / "straight", 4)
    assert summary["effective_batch_size"] == 4 and summary["hardware"] == "2 x cpu"
    launch(data, tmp_path / "cohort", tmp_path / "resumed", 2)
    # one process may not continue a two-process run: batch, data order and LR would change
    options = settings(max_steps=4, train_batch_size=2, checkpointing_steps=2, ema_decay=0.9)
    with pytest.raises(
        ValueError, match=r"checkpoint-2 was written by 2 process\(es\); this run has 1"
    ):
        train(options, data, tmp_path / "resumed", {"run_name": "ddp"})
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-2" / "checkpoint.json").is_file()
    launch(data, tmp_path / "cohort", tmp_path / "resumed", 4)
    logs = [
        [json.loads(x) for x in (tmp_path / name / "train_log.jsonl").read_text().splitlines()]
        for name in ("straight", "resumed")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]  # one writer, no duplicate lines
    assert [r["loss"] for r in logs[1]] == [r["loss"] for r in logs[0]]
    want = StableDiffusionPipeline.from_pretrained(tmp_path / "straight").unet.state_dict()
    got = StableDiffusionPipeline.from_pretrained(tmp_path / "resumed").unet.state_dict()
    assert all(torch.allclose(want[k], got[k], atol=1e-6) for k in want)
