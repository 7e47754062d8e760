"""Fine-tune Stable Diffusion 2.x on the imagefolder dataset (diffusers + accelerate).

The recipe of diffusers' ``train_text_to_image.py`` in small parts, plus what a long run on
a cluster needs: full UNet or LoRA fine-tuning (optionally the text encoder too, with its
own learning rate), the target of the scheduler's prediction type (epsilon or v),
Min-SNR-γ weighting, offset noise, caption dropout, EMA, gradient checkpointing, fp16/bf16,
8-bit Adam; latents from a latent cache instead of encoding every step; a frozen text
encoder's hidden states cached per caption; a deterministic, resumable data and noise order
(a resumed run equals an uninterrupted one); settings-fingerprinted checkpoints every N
steps and on SIGTERM/SIGUSR1; a stop with the step named on a non-finite loss; held-out
loss and a seeded prompt grid every N steps.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from idc_diffusion.train import checkpoints as ckpt
from idc_diffusion.train.final_save import save_trained_pipeline, train_summary
from idc_diffusion.train.objective import heldout_loss_from_moments
from idc_diffusion.train.resume import (
    Resumed,
    end_distributed,
    resume,
    save_step_checkpoint,
    stop_reason,
    stop_signal,
)
from idc_diffusion.train.run_setup import TrainingRun, check_settings, set_up_run
from idc_diffusion.train.train_data import BatchStream, epoch_of, make_loader

log = logging.getLogger(__name__)

LOG_EVERY = 10

# Options added after the first release; their defaults keep the original behaviour.
DEFAULTS: dict[str, Any] = {
    "mode": "full",
    "lora_rank": 16,
    "lora_alpha": 16,
    "train_text_encoder": False,
    "text_encoder_learning_rate": None,
    "min_snr_gamma": None,
    "noise_offset": 0.0,
    "caption_dropout": 0.0,
    "random_flip": False,
    "ema_decay": None,
    "gradient_checkpointing": False,
    "attention": "sdpa",
    "optimizer": "adamw",
    "use_latent_cache": False,
    "stop_margin_seconds": 120,
    "validation_steps": 0,
    "validation_prompts": [],
    "validation_images_per_prompt": 2,
    "validation_inference_steps": 20,
    "validation_guidance_scale": 4.0,
}


class TrainingInterrupted(RuntimeError):
    """A SIGTERM/SIGUSR1 or the job's time budget stopped training after a checkpoint."""

    def __init__(self, signum: int, step: int, folder: Path) -> None:
        super().__init__(f"{stop_reason(signum)}: stopped after step {step}, checkpoint {folder}")
        self.signum, self.step, self.folder = signum, step, folder


def with_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The train settings with every option present (DEFAULTS for the missing ones)."""
    return {**DEFAULTS, **settings}


def train(
    settings: dict,
    data_dir: Path,
    out_dir: Path,
    provenance: dict | None,
    latent_dir: Path | None = None,
    base_dir: Path | None = None,
) -> dict:
    """Fine-tune the base model; write the pipeline, log and summary to out_dir.

    With `provenance` (run name, cohort summary, base manifest) also ``model_card.md``; the
    workflow writes the card in a rule of its own instead (model-card), so that a new run
    name rewrites the card without retraining.

    `latent_dir` is a shared latent cache tried first when ``use_latent_cache`` is on.
    `base_dir` is the base_model stage's pipeline folder (the workflow's jobs load the base
    from there); without it ``settings["base_model"]`` is loaded directly.
    Returns the train summary (also written to ``out_dir/train_summary.json``). Raises
    NonFiniteLoss on a NaN/inf loss and TrainingInterrupted after SIGTERM/SIGUSR1.
    """
    started = time.perf_counter()
    settings = with_defaults(settings)
    check_settings(settings)
    run = set_up_run(settings, Path(data_dir), Path(out_dir), latent_dir, base_dir)
    loss_base = None
    if run.accelerator.is_main_process:
        loss_base = current_heldout_loss(run)
        log.info("held-out loss of the base model (%s, %d images): %s", run.heldout.name,
                 len(run.heldout), loss_base)  # fmt: skip
    resumed = resume(run)
    journal = open_journal(run, resumed)
    log_batch_layout(run, journal)
    run_steps(run, resumed, journal, training_batches(run, resumed.step))
    return finish(run, journal, loss_base, started, provenance)


# --------------------------------------------------------------------------- held-out checks


def current_heldout_loss(run: TrainingRun) -> float | None:
    """Held-out loss of the current weights (the EMA weights when EMA is on)."""
    if run.heldout_moments is None:
        return None
    accelerator, ema = run.accelerator, run.ema
    model, encoder = accelerator.unwrap_model(run.unet), accelerator.unwrap_model(run.text_encoder)
    with ema.swapped() if ema is not None else contextlib.nullcontext(), accelerator.autocast():
        return heldout_loss_from_moments(
            model, encoder, run.tokenizer, run.scheduler, *run.heldout_moments,
            run.heldout.captions, run.seed, run.vae.config.scaling_factor,
        )  # fmt: skip


def render_validation(run: TrainingRun, step: int) -> None:
    """The validation prompt grid of the current weights (EMA's when on), if prompts are set."""
    settings, accelerator, ema = run.settings, run.accelerator, run.ema
    if not settings["validation_prompts"]:
        return
    from idc_diffusion.train.validation import save_validation_grid

    view = SimpleNamespace(
        unet=accelerator.unwrap_model(run.unet), vae=run.vae, tokenizer=run.tokenizer,
        text_encoder=accelerator.unwrap_model(run.text_encoder), scheduler=run.pipeline.scheduler,
    )  # fmt: skip
    with ema.swapped() if ema is not None else contextlib.nullcontext(), accelerator.autocast():
        path = save_validation_grid(
            view, settings["validation_prompts"], run.out_dir, step,
            settings["validation_images_per_prompt"], run.seed,
            settings["validation_inference_steps"], settings["validation_guidance_scale"],
        )  # fmt: skip
    log.info("validation images: %s", path)


def validate(run: TrainingRun, record: dict[str, Any]) -> None:
    """The held-out loss into `record` and the prompt grid (main process); all wait."""
    if run.accelerator.is_main_process:
        record["val_loss"] = current_heldout_loss(run)
        render_validation(run, record["step"])
    run.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------- the step loop


@dataclass
class Journal:
    """The record of each step: train_log.jsonl and TensorBoard scalars (main process only;
    `board` is None elsewhere and when tensorboard is not importable)."""

    path: Path
    board: Any = None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` to the log; its loss, lr and val_loss to TensorBoard."""
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.board is not None:
            for key in ("loss", "lr", "val_loss"):
                if record.get(key) is not None:
                    self.board.add_scalar(f"train/{key}", record[key], record["step"])

    def close(self) -> None:
        """Close TensorBoard's writer, if open."""
        if self.board is not None:
            self.board.close()


def open_tensorboard(folder: Path):
    """A TensorBoard SummaryWriter when tensorboard is importable, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def open_journal(run: TrainingRun, resumed: Resumed) -> Journal:
    """The run's journal: the log `resume` restored, TensorBoard on the main process."""
    board = None
    if run.accelerator.is_main_process:
        board = open_tensorboard(run.out_dir / "tensorboard")
    return Journal(resumed.log_path, board)


def log_batch_layout(run: TrainingRun, journal: Journal) -> None:
    """One line: mode, attention, precision and how the effective batch is made up."""
    settings, accelerator = run.settings, run.accelerator
    log.info(
        "mode %s%s, attention %s, precision %s; effective batch %d = %d per device x %d "
        "devices x %d accumulation; TensorBoard: %s",
        settings["mode"], " + text encoder" if run.train_text else "", run.attention,
        accelerator.mixed_precision, run.effective_batch_size, settings["train_batch_size"],
        accelerator.num_processes, settings["gradient_accumulation_steps"],
        "on" if journal.board else "off (tensorboard not importable)",
    )  # fmt: skip


def training_batches(run: TrainingRun, start_step: int) -> Iterator[Any]:
    """This process's batches from optimizer step `start_step` on (a deterministic order)."""
    settings, accelerator = run.settings, run.accelerator
    stream = BatchStream(
        len(run.train_split),
        settings["train_batch_size"],
        run.seed,
        start=start_step * settings["gradient_accumulation_steps"],
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    return iter(make_loader(run.dataset, stream, settings["dataloader_workers"]))


def run_steps(run: TrainingRun, resumed: Resumed, journal: Journal, batches: Iterator[Any]) -> None:
    """Optimizer steps from the resumed one to max_steps, each logged; validation every
    validation_steps; a checkpoint every checkpointing_steps, at the end and on a stop
    (SIGTERM/SIGUSR1 or the SLURM time budget), which ends the run: TrainingInterrupted."""
    settings, accelerator = run.settings, run.accelerator
    max_steps, validation_steps = settings["max_steps"], settings["validation_steps"]
    loop_start = time.perf_counter()
    tick = (loop_start, resumed.step)
    budget = ckpt.TimeBudget(ckpt.slurm_end_time(), settings["stop_margin_seconds"])
    if budget.end is not None:
        log.info("SLURM job ends at %s: checkpointing and stopping before it",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(budget.end)))  # fmt: skip
    with ckpt.StopSignals() as signals:
        for step in range(resumed.step, max_steps):
            step_started = time.perf_counter()
            losses = run.stepper(batches, step)
            done = step + 1
            seconds = resumed.seconds + time.perf_counter() - loop_start
            record = step_record(run, step, losses, seconds)
            if validation_steps and (done % validation_steps == 0 or done == max_steps):
                validate(run, record)
            if accelerator.is_main_process:
                journal.write(record)
            if done % LOG_EVERY == 0 or done == max_steps:
                tick = log_progress(record, max_steps, tick)
            budget.step_took(time.perf_counter() - step_started)
            spent = ckpt.BUDGET_STOP if budget.spent(time.time()) else 0
            signum = stop_signal(accelerator, signals.signum or spent)
            if done % settings["checkpointing_steps"] == 0 or done == max_steps or signum:
                saving = time.perf_counter()
                save_step_checkpoint(run, resumed, done, seconds, signum)
                budget.checkpoint_took(time.perf_counter() - saving)
            if signum and done < max_steps:
                stop_early(run, resumed, journal, signum, done)


def step_record(run: TrainingRun, step: int, losses: list[float], seconds: float) -> dict[str, Any]:
    """The log line of optimizer step `step` (0-based): epoch, mean loss, lr, seconds."""
    settings, accelerator = run.settings, run.accelerator
    return {
        "step": step + 1,
        "epoch": epoch_of(len(run.train_split),
                          settings["train_batch_size"] * accelerator.num_processes,
                          step * settings["gradient_accumulation_steps"]),
        "loss": sum(losses) / len(losses),
        "lr": run.stepper.lr_scheduler.get_last_lr()[0],
        "seconds": round(seconds, 4),
    }  # fmt: skip


def log_progress(
    record: Mapping[str, Any], max_steps: int, tick: tuple[float, int]
) -> tuple[float, int]:
    """Log step, loss, lr and the steps/s since `tick` (time, step); the new tick."""
    done = record["step"]
    rate = (done - tick[1]) / max(time.perf_counter() - tick[0], 1e-9)
    tick = (time.perf_counter(), done)
    log.info("step %d/%d loss %.4f lr %.3g %.2f it/s", done, max_steps,
             record["loss"], record["lr"], rate)  # fmt: skip
    return tick


def stop_early(
    run: TrainingRun, resumed: Resumed, journal: Journal, signum: int, done: int
) -> None:
    """Leave after the checkpoint of step `done`: TrainingInterrupted names stop and folder."""
    log.warning("stop code %d (%s): stopping after step %d; resume continues from "
                "%s", signum, stop_reason(signum), done, resumed.folder)  # fmt: skip
    journal.close()
    end_distributed(run.accelerator)
    raise TrainingInterrupted(signum, done, resumed.folder)


def finish(
    run: TrainingRun,
    journal: Journal,
    loss_base: float | None,
    started: float,
    provenance: dict | None,
) -> dict:
    """The final held-out loss, the summary, and (main process) the saved pipeline."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    loss_final = None
    if accelerator.is_main_process:
        loss_final = current_heldout_loss(run)
        log.info("held-out loss: base %s -> fine-tuned %s", loss_base, loss_final)
    summary = train_summary(run, loss_base, loss_final, started)
    if accelerator.is_main_process:
        save_trained_pipeline(run, summary, provenance)
        journal.close()
    end_distributed(accelerator)
    return summary


__all__ = ["DEFAULTS", "TrainingInterrupted", "train", "with_defaults"]
