"""One optimizer step of the training loop: each micro-batch's draws and loss on the device,
gradient accumulation and clipping, the optimizer and LR schedule, the EMA update, and the
stop on a non-finite loss."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator

from idc_diffusion.train import checkpoints as ckpt
from idc_diffusion.train.ema import EMA
from idc_diffusion.train.loss_weighting import offset_noise
from idc_diffusion.train.objective import (
    Draws,
    denoising_loss,
    draw_batch,
    encode_batch,
    flipped,
    sample_latents,
)
from idc_diffusion.train.train_data import seeded_generator


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; nothing after the last checkpoint is kept."""


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor` on `device`; a CPU tensor bound for a GPU goes through pinned memory,
    copied without the host waiting (the draws stay on the CPU by design: the same seeds
    give the same run on any device)."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    pinned = tensor if tensor.is_pinned() else tensor.pin_memory()
    return pinned.to(device, non_blocking=True)


def batch_loss(
    batch: Mapping[str, torch.Tensor],
    draws: Draws,
    parts: Mapping[str, Any],
    settings: Mapping[str, Any],
    device: torch.device,
) -> torch.Tensor:
    """Mean training loss of one micro-batch: cached moments or pixels encoded now; the
    captions' hidden states from ``parts["text_embeddings"]`` when that is set."""
    vae, scheduler = parts["vae"], parts["scheduler"]
    eps, noise, timesteps = (
        to_device(t, device) for t in (draws.eps, draws.noise, draws.timesteps)
    )
    if "mean" in batch:
        mean = flipped(to_device(batch["mean"], device), draws.flip)
        std = flipped(to_device(batch["std"], device), draws.flip)
    else:
        pixels = to_device(batch["pixel_values"], device)
        mean, std = encode_batch(vae, flipped(pixels, draws.flip))
    latents = sample_latents(mean, std, eps, vae.config.scaling_factor)
    if draws.offsets is not None:
        noise = offset_noise(noise, to_device(draws.offsets, device), settings["noise_offset"])
    input_ids = batch["input_ids"]
    if draws.drop is not None:
        input_ids = torch.where(draws.drop[:, None], parts["empty_ids"], input_ids)
    if parts["text_embeddings"] is not None:
        hidden = parts["text_embeddings"](input_ids)
    else:
        with torch.set_grad_enabled(settings["train_text_encoder"]):
            hidden = parts["text_encoder"](input_ids.to(device), return_dict=False)[0]
    losses = denoising_loss(
        parts["unet"], scheduler, latents, noise.to(latents.dtype), timesteps, hidden,
        settings["min_snr_gamma"],
    )  # fmt: skip
    return losses.mean()


@dataclass
class Stepper:
    """One optimizer step of the training loop: `accumulation` micro-batches, each with
    draws seeded by (seed, micro-batch index, process), then the EMA update. The losses
    are read back (and checked) once, after the optimizer step, so the device runs the
    whole step without waiting for the host in between."""

    accelerator: Accelerator
    parts: dict[str, Any]
    settings: Mapping[str, Any]
    optimizer: Any
    lr_scheduler: Any
    trained: list[torch.nn.Module]
    clip_params: list[torch.nn.Parameter]
    shape: tuple[int, int, int]
    ema: EMA | None = None
    checkpoints: Path | None = None

    def __call__(self, batches: Any, step: int) -> list[float]:
        """Run optimizer step `step` (0-based) on the next batches; the micro-batch losses."""
        acc, settings = self.accelerator, self.settings
        accumulation = settings["gradient_accumulation_steps"]
        num_timesteps = self.parts["scheduler"].config.num_train_timesteps
        losses = []
        for micro in range(accumulation):
            batch = next(batches)
            index = step * accumulation + micro
            generator = seeded_generator(settings["seed"], index, acc.process_index)
            count = len(batch["input_ids"])
            draws = draw_batch(generator, count, self.shape, num_timesteps, settings)
            with acc.accumulate(*self.trained), acc.autocast():
                loss = batch_loss(batch, draws, self.parts, settings, acc.device)
                losses.append(acc.gather(loss.detach()).mean())
                acc.backward(loss)
                if acc.sync_gradients:
                    acc.clip_grad_norm_(self.clip_params, settings["max_grad_norm"])
                self.optimizer.step()
                self.lr_scheduler.step()
                self.optimizer.zero_grad()
        values = torch.stack(losses).tolist()
        for micro, value in enumerate(values):
            if not math.isfinite(value):
                raise NonFiniteLoss(non_finite_message(value, step + 1, micro, self.checkpoints))
        if self.ema is not None:
            self.ema.update()
        return values


def non_finite_message(value: float, step: int, micro: int, root: Path | None) -> str:
    """What to tell the user when the loss is NaN/inf at `step`."""
    found = ckpt.list_checkpoints(root) if root is not None else []
    last = f"{found[-1][1]} (step {found[-1][0]})" if found else "none (no checkpoint yet)"
    return (
        f"training loss is {value} at step {step} (micro-batch {micro}); stopped without "
        f"saving this step. Last good checkpoint: {last}. Lower train.learning_rate, use "
        "mixed_precision bf16 instead of fp16, or check the training images."
    )
