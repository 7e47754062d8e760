"""Training checkpoints: save (accelerate state + a small JSON), find, prune, fingerprint;
the stop signals (SLURM preemption) and the time budget (SLURM time limits) that ask for one.

``out_dir/checkpoints/checkpoint-<step>/`` holds ``accelerator.save_state`` output and
``checkpoint.json`` (step, settings fingerprint, process layout, seconds so far). A
checkpoint is complete only once its JSON exists: it is written last, after the folder is
renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from idc_diffusion.core.rerun import TRAIN_JOB_ONLY

log = logging.getLogger(__name__)

INFO = "checkpoint.json"
PREFIX = "checkpoint-"
# Settings of the validation pass: they change the held-out loss lines of train_log.jsonl
# and the validation grids (outputs: a change reruns train), never the trajectory.
VALIDATION_ONLY = frozenset(
    {
        "validation_steps",
        "validation_prompts",
        "validation_images_per_prompt",
        "validation_inference_steps",
        "validation_guidance_scale",
    }
)
# Settings that never change the training trajectory.
UNFINGERPRINTED = TRAIN_JOB_ONLY | VALIDATION_ONLY
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The stop code of a run whose time budget is spent (SIGALRM: "the timer ran out").
BUDGET_STOP = int(signal.SIGALRM)
# Schedules whose learning rate at step k does not depend on max_steps.
STEP_FREE_SCHEDULES = frozenset({"constant", "constant_with_warmup"})


def fingerprint(settings: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> str:
    """Hash of everything that determines training up to a step.

    ``max_steps`` only counts when the LR schedule depends on it (linear, cosine), so a
    constant-schedule run can be extended by raising max_steps and resuming.
    """
    relevant = {k: v for k, v in settings.items() if k not in UNFINGERPRINTED}
    if relevant.get("lr_scheduler") in STEP_FREE_SCHEDULES:
        relevant.pop("max_steps", None)
    relevant.update(extra or {})
    text = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def layout_problem(info: Mapping[str, Any], layout: Mapping[str, Any], folder: Path) -> str | None:
    """Why the checkpoint described by `info` cannot continue on this process `layout`.

    The process count sets the global batch, each process's share of the data order and
    the LR scheduler's position (accelerate steps it once per process), so a checkpoint
    resumed on another count would silently become another run. None: it can continue.
    """
    saved = info.get("layout")
    if saved == dict(layout):
        return None
    was = (
        f"{saved.get('processes')} process(es)"
        if isinstance(saved, Mapping)
        else "a version that did not record its processes"
    )
    return (
        f"{folder} was written by {was}; this run has {layout['processes']}: resuming would "
        "change the batch, the data order and the learning-rate position. Resume with the "
        "same gpu/nodes resources, or set train.resume: never to start over (deletes them)"
    )


def checkpoint_dir(root: Path, step: int) -> Path:
    return root / f"{PREFIX}{step}"


def list_checkpoints(root: Path) -> list[tuple[int, Path, dict[str, Any]]]:
    """Complete checkpoints under `root` as (step, folder, info), oldest first."""
    found = []
    for folder in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        try:
            info = json.loads((folder / INFO).read_text(encoding="utf-8"))
            found.append((int(info["step"]), folder, info))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=lambda item: item[0])


def latest_compatible(
    root: Path, print_: str, max_step: int | None = None, cleanup: bool = True
) -> tuple[int, Path, dict[str, Any]] | None:
    """The newest checkpoint with fingerprint `print_` (and step <= `max_step`).

    With `cleanup`, checkpoints with another fingerprint and incomplete ones are deleted.
    """
    complete = list_checkpoints(root)
    matching = [item for item in complete if item[2].get("fingerprint") == print_]
    if cleanup:
        keep = {folder for _, folder, _ in matching}
        for folder in root.glob(f"{PREFIX}*") if root.is_dir() else []:
            if folder not in keep:
                log.info("deleting checkpoint %s: other settings or data, or incomplete", folder)
                shutil.rmtree(folder, ignore_errors=True)
    usable = [item for item in matching if max_step is None or item[0] <= max_step]
    return usable[-1] if usable else None


def delete_all(root: Path) -> None:
    """Remove every checkpoint under `root`."""
    for folder in root.glob(f"{PREFIX}*") if root.is_dir() else []:
        log.info("deleting checkpoint %s", folder.name)
        shutil.rmtree(folder, ignore_errors=True)


def save_checkpoint(accelerator, root: Path, step: int, info: Mapping[str, Any]) -> Path:
    """accelerator.save_state into checkpoint-<step>/, then its JSON (marks it complete)."""
    final = checkpoint_dir(root, step)
    partial = root / f".partial-{step}"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    accelerator.save_state(str(partial))
    partial.rename(final)
    (final / INFO).write_text(json.dumps({"step": step, **info}, indent=1), encoding="utf-8")
    return final


def prune_checkpoints(root: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints."""
    complete = list_checkpoints(root)
    for _, folder, _ in complete[: max(0, len(complete) - keep)]:
        log.info("removing old checkpoint %s", folder.name)
        shutil.rmtree(folder, ignore_errors=True)


class StopSignals:
    """Within the block, SIGTERM and SIGUSR1 only record themselves in ``signum``.

    The training loop polls ``signum`` after each step, writes a checkpoint and stops, so
    a preempted or time-limited SLURM job (``--signal=USR1@300``, or the SIGTERM before
    the kill) loses no finished step. Outside the main thread nothing is installed.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def _record(self, signum: int, frame: object) -> None:
        log.warning("received signal %d: checkpointing after the current step", signum)
        self.signum = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def parse_squeue_time(text: str) -> float | None:
    """Epoch seconds of a time as ``squeue -o %e`` prints it (local ISO time); None for
    ``N/A``, ``NONE``, ``Unknown`` and other non-times (no limit known)."""
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        return None


def slurm_end_time(env: Mapping[str, str] | None = None) -> float | None:
    """When the running SLURM job reaches its time limit (epoch seconds); None outside
    SLURM or without a limit. ``SLURM_JOB_END_TIME`` where SLURM sets it (23.02 on), else
    ``squeue -h -j $SLURM_JOB_ID -o %e``."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_END_TIME", "").isdigit():
        return float(env["SLURM_JOB_END_TIME"])
    job = env.get("SLURM_JOB_ID")
    if not job:
        return None
    try:
        done = subprocess.run(
            ["squeue", "-h", "-j", job, "-o", "%e"],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("SLURM job %s: end time unknown (%s); no time budget", job, exc)
        return None
    return parse_squeue_time(done.stdout)


class TimeBudget:
    """Whether a job that ends at `end` (epoch seconds; None: never) can afford one more
    step and still write its checkpoint in time.

    It stops when now + the slowest step so far + the margin passes the end; the margin is
    twice the slowest checkpoint write so far, and at least `floor` seconds (the first
    checkpoint's estimate, and slack for the process to exit).
    """

    def __init__(self, end: float | None, floor: float) -> None:
        self.end, self.floor = end, floor
        self.slowest_step = self.slowest_checkpoint = 0.0

    def margin(self) -> float:
        return max(self.floor, 2.0 * self.slowest_checkpoint)

    def step_took(self, seconds: float) -> None:
        self.slowest_step = max(self.slowest_step, seconds)

    def checkpoint_took(self, seconds: float) -> None:
        self.slowest_checkpoint = max(self.slowest_checkpoint, seconds)

    def spent(self, now: float) -> bool:
        return self.end is not None and now + self.slowest_step + self.margin() >= self.end
