"""A resumable run: continue from the latest compatible checkpoint (accelerate state and the
log as it was there), save a checkpoint after a step (saying why the run stops there), agree
on a stop across processes, and leave the process group together."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from idc_diffusion.train import checkpoints as ckpt
from idc_diffusion.train.run_setup import TrainingRun
from idc_diffusion.train.train_data import split_fingerprint

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
# Seconds the ranks wait, with the GIL released, before their process group can be torn down
SETTLE_SECONDS = 1.0


def stop_reason(signum: int) -> str:
    """What a stop code means: the job's time budget, or the signal that asked to stop."""
    return "time budget spent" if signum == ckpt.BUDGET_STOP else f"signal {signum}"


def resume_point(
    settings: Mapping[str, Any],
    root: Path,
    print_: str,
    layout: Mapping[str, Any] | None = None,
    cleanup: bool = True,
) -> tuple[int, Path, dict] | None:
    """The checkpoint to continue from; None: start over (`cleanup` deletes stale ones).

    With `layout`, raises ValueError when that checkpoint was written on another one.
    """
    if settings["resume"] == "never":
        if cleanup:
            ckpt.delete_all(root)
        return None
    found = ckpt.latest_compatible(root, print_, settings["max_steps"], cleanup)
    problem = found and layout and ckpt.layout_problem(found[2], layout, found[1])
    if problem:
        raise ValueError(problem)
    return found


def restore_log(path: Path, checkpoint: Path | None) -> None:
    """Start train_log.jsonl as it was at `checkpoint` (empty for a fresh start).

    Each checkpoint keeps a copy of the log: Snakemake deletes a rule's declared outputs,
    the log among them, before rerunning an interrupted job, and lines written after the
    checkpoint belong to steps that will be redone.
    """
    saved = checkpoint / LOG_NAME if checkpoint is not None else None
    if saved is not None and saved.is_file():
        shutil.copyfile(saved, path)
    else:
        path.write_text("", encoding="utf-8")


@dataclass
class Resumed:
    """Where the run stands in its checkpoints: the step it continues from (0: a fresh
    start), the seconds trained before it, and the latest checkpoint folder."""

    root: Path
    fingerprint: str
    layout: dict[str, Any]
    log_path: Path  # train_log.jsonl
    step: int = 0
    seconds: float = 0.0
    folder: Path | None = None


def resume(run: TrainingRun) -> Resumed:
    """Load the latest checkpoint of these settings, data and process layout, if any
    (stale ones deleted), and start train_log.jsonl as it was there."""
    accelerator, settings = run.accelerator, run.settings
    root = run.checkpoint_root
    print_ = ckpt.fingerprint(
        settings, {"data": split_fingerprint(run.train_split), "resolution": run.resolution}
    )
    layout = {"processes": accelerator.num_processes}
    resumed = Resumed(root, print_, layout, run.out_dir / LOG_NAME)
    if accelerator.is_main_process:
        resume_point(settings, root, print_, cleanup=True)  # every process checks, below
    accelerator.wait_for_everyone()
    found = resume_point(settings, root, print_, layout, cleanup=False)
    if found is not None:
        resumed.step, resumed.folder, info = found
        accelerator.load_state(str(resumed.folder))
        resumed.seconds = float(info.get("seconds", 0.0))
        log.info("resuming from %s (step %d)", resumed.folder.name, resumed.step)
    if accelerator.is_main_process:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        restore_log(resumed.log_path, resumed.folder)
    return resumed


def save_step_checkpoint(
    run: TrainingRun, resumed: Resumed, done: int, seconds: float, signum: int
) -> None:
    """Checkpoint step `done` (with the log so far) and prune old ones; `signum` (a stop
    code, 0: none) is recorded with the exit code when the run stops before max_steps."""
    accelerator, max_steps = run.accelerator, run.settings["max_steps"]
    accelerator.wait_for_everyone()
    resumed.folder = resumed.root / f"{ckpt.PREFIX}{done}"
    if accelerator.is_main_process:
        info = {"fingerprint": resumed.fingerprint, "layout": resumed.layout, "seconds": seconds}
        if signum and done < max_steps:  # why this run stops here, and its exit
            info["stop"] = {"reason": stop_reason(signum), "exit_code": 128 + signum}
        resumed.folder = ckpt.save_checkpoint(accelerator, resumed.root, done, info)
        shutil.copyfile(resumed.log_path, resumed.folder / LOG_NAME)
        ckpt.prune_checkpoints(resumed.root, run.settings["checkpoints_total_limit"])
        log.info("saved %s", resumed.folder.name)
    accelerator.wait_for_everyone()


def stop_signal(accelerator: Accelerator, signum: int) -> int:
    """The stop code any process has (`signum` here; 0: none); every process gets the
    same answer. One process answers without a device round trip."""
    if accelerator.num_processes == 1:
        return signum
    flag = torch.tensor([signum], device=accelerator.device)
    return int(accelerator.gather(flag).max())


def end_distributed(accelerator: Accelerator) -> None:
    """Every rank leaves together, and only once the process group's threads are idle.

    gloo's worker threads free the last collectives (a barrier keeps the gather of the step
    before it alive) after the ranks have moved on, and need the GIL to drop their Python
    tensors; the process group's destructor, run with the GIL held when train() returns and
    the DDP wrappers go, joins those threads: the rank hung there for good (seen with 2 CPU
    ranks, one in a few runs, in ``~ProcessGroupGloo`` -> ``std::thread::join`` while a
    worker waited for the GIL in ``~AsyncAllgatherWork``). Sleeping after the last barrier
    hands the workers the GIL first.
    """
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        time.sleep(SETTLE_SECONDS)
    accelerator.end_training()
