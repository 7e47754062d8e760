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
import math
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from idc_diffusion.train import checkpoints as ckpt
from idc_diffusion.train import latent_cache
from idc_diffusion.train.attention import configure_attention
from idc_diffusion.train.ema import EMA
from idc_diffusion.train.loss_weighting import min_snr_weights, offset_noise, snr, weighted_mse
from idc_diffusion.train.model_card import render_model_card
from idc_diffusion.train.models import TINY, load_base_pipeline
from idc_diffusion.train.text_embeddings import TextEmbeddingCache
from idc_diffusion.train.train_data import (
    BatchStream,
    CaptionedImages,
    Split,
    epoch_of,
    image_resolution,
    load_images,
    make_loader,
    read_split,
    seeded_generator,
    split_fingerprint,
    tokenize,
)

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "train_summary.json"
CARD_NAME = "model_card.md"
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOG_EVERY = 10
# The dtype of frozen weights (VAE, frozen text encoder) per train.mixed_precision.
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}

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


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite; nothing after the last checkpoint is kept."""


def stop_reason(signum: int) -> str:
    """What a stop code means: the job's time budget, or the signal that asked to stop."""
    return "time budget spent" if signum == ckpt.BUDGET_STOP else f"signal {signum}"


class TrainingInterrupted(RuntimeError):
    """A SIGTERM/SIGUSR1 or the job's time budget stopped training after a checkpoint."""

    def __init__(self, signum: int, step: int, folder: Path) -> None:
        super().__init__(f"{stop_reason(signum)}: stopped after step {step}, checkpoint {folder}")
        self.signum, self.step, self.folder = signum, step, folder


def with_defaults(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The train settings with every option present (DEFAULTS for the missing ones)."""
    return {**DEFAULTS, **settings}


# --------------------------------------------------------------------------- diffusion loss


def prediction_target(
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
) -> torch.Tensor:
    """What the UNet learns: the noise (epsilon) or the velocity (v_prediction)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind!r}; supported: {PREDICTION_TYPES}")


def latent_shape(vae: torch.nn.Module, resolution: int) -> tuple[int, int, int]:
    """(channels, height, width) of the VAE latents of a `resolution` px square."""
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, resolution // factor, resolution // factor)


def draw_noise(
    generator: torch.Generator, count: int, shape: tuple[int, int, int], num_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU draws, in a fixed order: VAE posterior noise, diffusion noise, timesteps."""
    eps = torch.randn((count, *shape), generator=generator)
    noise = torch.randn((count, *shape), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (count,), generator=generator)
    return eps, noise, timesteps


@dataclass
class Draws:
    """Every random choice of one micro-batch (CPU tensors); the options' extras are None
    when the option is off, so enabling one never changes the draws before it."""

    eps: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    offsets: torch.Tensor | None = None  # [N, C] offset-noise directions
    drop: torch.Tensor | None = None  # [N] bool: caption replaced by ""
    flip: torch.Tensor | None = None  # [N] bool: mirrored left-right


def draw_batch(
    generator: torch.Generator,
    count: int,
    shape: tuple[int, int, int],
    num_timesteps: int,
    settings: Mapping[str, Any],
) -> Draws:
    """draw_noise, then the extras of noise_offset, caption_dropout and random_flip."""
    draws = Draws(*draw_noise(generator, count, shape, num_timesteps))
    if settings["noise_offset"]:
        draws.offsets = torch.randn((count, shape[0]), generator=generator)
    if settings["caption_dropout"]:
        draws.drop = torch.rand(count, generator=generator) < settings["caption_dropout"]
    if settings["random_flip"]:
        draws.flip = torch.rand(count, generator=generator) < 0.5
    return draws


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor, scaling: float
) -> torch.Tensor:
    """A VAE posterior sample ``mean + std * eps``, times the VAE scaling factor."""
    return (mean + std * eps.to(mean)) * scaling


@torch.no_grad()
def encode_batch(vae: torch.nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior's mean and std of a pixel batch (in the VAE's dtype)."""
    posterior = vae.encode(pixels.to(vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def flipped(x: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
    """`x` with the samples marked in `flip` mirrored along the width."""
    if flip is None:
        return x
    return torch.where(flip.to(x.device).view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def denoising_loss(
    unet: torch.nn.Module,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    hidden: torch.Tensor,
    min_snr_gamma: float | None = None,
) -> torch.Tensor:
    """Per-sample MSE of the UNet's prediction against the scheduler's target.

    With `min_snr_gamma`, each sample is weighted by Min-SNR-γ for the prediction type.
    """
    weights = None
    if min_snr_gamma:
        snr_t = snr(scheduler.alphas_cumprod, timesteps)
        weights = min_snr_weights(snr_t, min_snr_gamma, scheduler.config.prediction_type)
    with torch.no_grad():
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(scheduler, latents, noise, timesteps)
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    return weighted_mse(pred, target, weights)


def diffusion_loss(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    scheduler: DDPMScheduler,
    pixel_values: torch.Tensor,
    input_ids: torch.Tensor,
    draws: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    reduction: str = "mean",
) -> torch.Tensor:
    """The denoising MSE of `unet` on one pixel batch, given its noise `draws` (draw_noise).

    Latents are a VAE posterior sample times the VAE's scaling factor; the noise lands on
    the batch's device, so the same draws give the same loss on any device.
    """
    device = pixel_values.device
    eps, noise, timesteps = (t.to(device) for t in draws)
    mean, std = encode_batch(vae, pixel_values)
    latents = sample_latents(mean, std, eps, vae.config.scaling_factor)
    with torch.no_grad():
        hidden = text_encoder(input_ids.to(device), return_dict=False)[0]
    loss = denoising_loss(unet, scheduler, latents, noise.to(latents.dtype), timesteps, hidden)
    return loss.mean() if reduction == "mean" else loss


def heldout_loss_from_moments(
    unet: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    scheduler: DDPMScheduler,
    mean: torch.Tensor,
    std: torch.Tensor,
    captions: Sequence[str],
    seed: int,
    scaling: float,
    batch_size: int = 8,
) -> float:
    """Mean (unweighted) denoising loss of held-out latent moments, with fixed draws.

    Image i's noise and timestep come from a generator seeded by (seed, i), so two UNets
    evaluated with the same arguments see identical latents, noise and timesteps, whatever
    the batch size.
    """
    if len(mean) == 0:
        return float("nan")
    shape, steps = tuple(mean.shape[1:]), scheduler.config.num_train_timesteps
    per_image = [
        draw_noise(seeded_generator(seed, 0xE7A1, i), 1, shape, steps) for i in range(len(mean))
    ]
    input_ids = tokenize(tokenizer, captions)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(mean), batch_size):
                chunk = slice(start, start + batch_size)
                eps, noise, timesteps = (
                    torch.cat(parts).to(device) for parts in zip(*per_image[chunk], strict=True)
                )
                latents = sample_latents(
                    mean[chunk].to(device), std[chunk].to(device), eps, scaling
                )
                hidden = text_encoder(input_ids[chunk].to(device), return_dict=False)[0]
                losses = denoising_loss(
                    unet, scheduler, latents, noise.to(latents.dtype), timesteps, hidden
                )
                total += float(losses.sum())
    finally:
        unet.train(was_training)
    return total / len(mean)


def heldout_loss(
    unet: torch.nn.Module,
    vae: torch.nn.Module,
    text_encoder: torch.nn.Module,
    tokenizer: Any,
    scheduler: DDPMScheduler,
    images: torch.Tensor,
    captions: Sequence[str],
    seed: int,
    batch_size: int = 8,
) -> float:
    """heldout_loss_from_moments of `images` ([N, 3, H, W] in [-1, 1]) encoded by `vae`."""
    if len(images) == 0:
        return float("nan")
    mean, std = latent_cache.encode_moments(vae, images, batch_size)
    return heldout_loss_from_moments(
        unet, text_encoder, tokenizer, scheduler, mean, std, captions, seed,
        vae.config.scaling_factor, batch_size,
    )  # fmt: skip


# --------------------------------------------------------------------------- setup helpers


def check_settings(settings: Mapping[str, Any]) -> None:
    """Fail before any model is loaded on options that cannot work here."""
    if settings["mode"] not in ("full", "lora"):
        raise ValueError(f"train.mode must be 'full' or 'lora', got {settings['mode']!r}")
    if settings["optimizer"] == "adamw_8bit":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise ValueError(
                "train.optimizer 'adamw_8bit' needs bitsandbytes, which is not importable "
                "here; install it (pip install bitsandbytes, CUDA only) or set "
                "train.optimizer: adamw"
            ) from exc
    elif settings["optimizer"] != "adamw":
        raise ValueError(f"train.optimizer must be adamw or adamw_8bit: {settings['optimizer']!r}")
    if settings["validation_steps"] and not settings["validation_prompts"]:
        log.info("train.validation_steps set without validation_prompts: held-out loss only")


def load_splits(settings: Mapping[str, Any], data_dir: Path) -> tuple[Split, Split, int]:
    """Train and held-out splits and the image resolution (ValueError for unusable data)."""
    train_split = read_split(data_dir, "train")
    if len(train_split) == 0:
        raise ValueError(
            f"no training images: {train_split.metadata} is missing or empty; run the "
            "prepare/dataset stages first, or widen the cohort so the train split gets series"
        )
    resolution = image_resolution(train_split)
    heldout = read_split(data_dir, settings["heldout_split"])
    limit = settings["heldout_max_images"]
    if limit and len(heldout) == 0:
        raise ValueError(
            f"no held-out images: {heldout.metadata} is missing or empty (its DICOM removed "
            "before prepare ran, or a cohort too small for the split); rerun prepare/dataset, "
            "or set train.heldout_max_images: 0 to train without a held-out loss"
        )
    heldout = Split(
        heldout.name,
        heldout.metadata,
        heldout.paths[:limit],
        heldout.captions[:limit],
        heldout.pixel_sources[:limit],
    )
    if len(heldout) and image_resolution(heldout) != resolution:
        raise ValueError(
            f"{heldout.metadata}: held-out images are not {resolution} px like the train split"
        )
    return train_split, heldout, resolution


def make_lr_scheduler(settings: Mapping[str, Any], optimizer, num_processes: int):
    """diffusers' get_scheduler; steps scaled by processes (accelerate steps it once each)."""
    return get_scheduler(
        settings["lr_scheduler"],
        optimizer=optimizer,
        num_warmup_steps=settings["lr_warmup_steps"] * num_processes,
        num_training_steps=settings["max_steps"] * num_processes,
    )


def make_optimizer(settings: Mapping[str, Any], groups: list[dict]) -> torch.optim.Optimizer:
    """AdamW (torch) or 8-bit AdamW (bitsandbytes) over parameter groups with their own lr.

    torch's AdamW runs its fused kernel where `fusable`, except under fp16: there the
    GradScaler skips an overflowing step inside a fused kernel, unseen by accelerate, which
    would then advance the LR schedule on a skipped step.
    """
    hyper = {
        "lr": settings["learning_rate"],
        "betas": (settings["adam_beta1"], settings["adam_beta2"]),
        "weight_decay": settings["adam_weight_decay"],
        "eps": settings["adam_epsilon"],
    }
    if settings["optimizer"] == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **hyper)
    fused = fusable(groups) and settings["mixed_precision"] != "fp16"
    return torch.optim.AdamW(groups, fused=True if fused else None, **hyper)


def fusable(groups: Sequence[Mapping[str, Any]]) -> bool:
    """Whether torch's fused AdamW serves every parameter: floating, on CPU or CUDA.

    One kernel updates all tensors (same AdamW update, rounded in another order), instead
    of a dozen ops per tensor; on CPU that is ~4x faster for a small UNet.
    """
    params = [p for group in groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def trainable_parameters(
    settings: Mapping[str, Any], unet: torch.nn.Module, text_encoder: torch.nn.Module
) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """Set up the mode (full or LoRA adapters); returns the UNet's and text encoder's
    trainable parameters (the latter empty unless train_text_encoder)."""
    train_text = settings["train_text_encoder"]
    if settings["mode"] == "lora":
        from idc_diffusion.train.lora import add_lora

        add_lora(unet, settings["lora_rank"], settings["lora_alpha"])
        if train_text:
            add_lora(text_encoder, settings["lora_rank"], settings["lora_alpha"], text=True)
        else:
            text_encoder.requires_grad_(False)
    else:
        unet.requires_grad_(True)
        text_encoder.requires_grad_(train_text)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    text_params = [p for p in text_encoder.parameters() if p.requires_grad] if train_text else []
    return unet_params, text_params


def place_models(
    settings: Mapping[str, Any],
    parts: Mapping[str, torch.nn.Module],
    device: torch.device,
    weight_dtype: torch.dtype,
) -> None:
    """Frozen weights in the mixed-precision dtype, the UNet (and a trained text encoder,
    LoRA base included) in float32, all on device; the UNet in train mode.

    A LoRA base stays in float32 so that the adapters fuse into full-precision weights
    (autocast runs its matmuls in the mixed-precision dtype anyway).
    """
    vae, unet, text_encoder = parts["vae"], parts["unet"], parts["text_encoder"]
    _move(vae.requires_grad_(False).eval(), device, weight_dtype)
    if not settings["train_text_encoder"]:
        _move(text_encoder.eval(), device, weight_dtype)
    else:
        _move(text_encoder.train(), device, torch.float32)
    _move(unet.train(), device, torch.float32)  # diffusers' DDP stride fix needs train mode
    for model in (unet, text_encoder):
        for param in model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    if settings["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
        if settings["train_text_encoder"]:
            text_encoder.gradient_checkpointing_enable()


def enable_tf32() -> None:
    """TF32 tensor cores for float32 matmuls and convolutions (Ampere and later): the
    float32 parts of a mixed-precision step (and all of an fp32 one) run several times
    faster, with a 10-bit mantissa for the products and float32 accumulation."""
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True


def _move(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Move to `device`, casting only when the dtype differs (diffusers warns on casts)."""
    model.to(device) if model.dtype == dtype else model.to(device, dtype)


def ensure_latent_cache(
    accelerator: Accelerator,
    shared: Path | None,
    own: Path,
    vae: torch.nn.Module,
    vae_print: str,
    splits: Sequence[Split],
    resolution: int,
) -> Path:
    """A latent cache serving `splits`: `shared` (e.g. results/latents) when it fits,
    else train's own cache under the model folder, built now when missing or stale.

    The main process decides and tells the others (no process reads a cache that another
    is about to replace); a build is shared out, shard by shard, between all processes.
    """
    splits = [s for s in splits if len(s)]
    choice: list[str | None] = [None]
    if accelerator.is_main_process:
        choice = [usable_cache((shared, own), splits, vae_print, resolution)]
    if accelerator.num_processes > 1:
        choice = broadcast_object_list(choice)
    if choice[0] is not None:
        log.info("latent cache: %s", choice[0])
        return Path(choice[0])
    log.info("encoding %d images into the latent cache %s", sum(map(len, splits)), own)
    latent_cache.write_latent_cache(
        own, vae, splits, vae_print, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, wait=accelerator.wait_for_everyone,
    )  # fmt: skip
    return own


def usable_cache(
    roots: Sequence[Path | None], splits: Sequence[Split], vae_print: str, resolution: int
) -> str | None:
    """The first of `roots` that serves every split (None: none does; each reason logged)."""
    for root in roots:
        if root is None:
            continue
        problems = [latent_cache.cache_problem(root, s, vae_print, resolution) for s in splits]
        problems = [p for p in problems if p]
        if not problems:
            return str(root)
        log.info("latent cache %s not used: %s", root, "; ".join(problems))
    return None


# The slowest rate planned for when processes encode a latent cache between two barriers
# (images/s per process at 512 px), and the slack for other lone work between collectives
# (the main process saving a checkpoint or rendering validation images).
ENCODE_RATE = 5.0
GROUP_TIMEOUT_FLOOR = timedelta(minutes=30)


def process_group_timeout(images: int, processes: int) -> timedelta:
    """How long a process waits for the others at a collective before failing: the floor
    plus its share of `images` encoded at ENCODE_RATE (torch's default is 10 min)."""
    return GROUP_TIMEOUT_FLOOR + timedelta(seconds=math.ceil(images / processes / ENCODE_RATE))


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


def open_tensorboard(folder: Path):
    """A TensorBoard SummaryWriter when tensorboard is importable, else None."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder))


def hardware(accelerator: Accelerator) -> str:
    """The devices training ran on, e.g. '4 x NVIDIA H100 80GB HBM3' or '1 x cpu'."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{accelerator.num_processes} x {name}"


# --------------------------------------------------------------------------- training


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


def stop_signal(accelerator: Accelerator, signum: int) -> int:
    """The stop code any process has (`signum` here; 0: none); every process gets the
    same answer. One process answers without a device round trip."""
    if accelerator.num_processes == 1:
        return signum
    flag = torch.tensor([signum], device=accelerator.device)
    return int(accelerator.gather(flag).max())


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
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    train_split, heldout, resolution = load_splits(settings, data_dir)
    seed, accumulation = settings["seed"], settings["gradient_accumulation_steps"]
    images = len(train_split) + len(heldout)
    timeout = process_group_timeout(images, int(os.environ.get("WORLD_SIZE", "1")))
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation,
        mixed_precision=settings["mixed_precision"],
        kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)],
    )
    torch.manual_seed(seed)

    base_spec = str(base_dir) if base_dir else settings["base_model"]
    pipeline = load_base_pipeline(
        base_spec,
        settings["revision"],
        settings["tiny_seed"],
        resolution,
    )
    unet, vae, text_encoder, tokenizer = (
        pipeline.unet,
        pipeline.vae,
        pipeline.text_encoder,
        pipeline.tokenizer,
    )
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    prediction_type = scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"base model's prediction_type {prediction_type!r} is not supported")

    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    if device.type == "cuda":
        enable_tf32()
    use_cache = settings["use_latent_cache"]
    vae_print = latent_cache.cache_fingerprint(vae, weight_dtype) if use_cache else ""
    attention = configure_attention(unet, settings["attention"], accelerator.mixed_precision)
    unet_params, text_params = trainable_parameters(settings, unet, text_encoder)
    parts = {"vae": vae, "unet": unet, "text_encoder": text_encoder}
    place_models(settings, parts, device, weight_dtype)

    input_ids = tokenize(tokenizer, train_split.captions)
    cache_root = None
    if settings["use_latent_cache"]:
        own = out_dir / "latent_cache"
        splits = [train_split, heldout]
        cache_root = ensure_latent_cache(
            accelerator, latent_dir, own, vae, vae_print, splits, resolution
        )
        dataset = latent_cache.CachedLatents(cache_root, train_split, input_ids)
    else:
        dataset = CaptionedImages(train_split, input_ids)
    heldout_moments = None
    if len(heldout) and cache_root is not None:
        heldout_ids = tokenize(tokenizer, heldout.captions)
        heldout_moments = latent_cache.CachedLatents(cache_root, heldout, heldout_ids).all_moments()
    elif len(heldout):
        heldout_moments = latent_cache.encode_moments(vae, load_images(heldout.paths))

    groups = [{"params": unet_params, "lr": settings["learning_rate"]}]
    if text_params:
        text_lr = settings["text_encoder_learning_rate"] or settings["learning_rate"]
        groups.append({"params": text_params, "lr": text_lr})
    optimizer = make_optimizer(settings, groups)
    lr_scheduler = make_lr_scheduler(settings, optimizer, accelerator.num_processes)
    if text_params:
        unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
            unet, text_encoder, optimizer, lr_scheduler
        )
    else:
        unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    ema = EMA(unet_params, settings["ema_decay"]) if settings["ema_decay"] else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    parts.update(unet=unet, text_encoder=text_encoder, scheduler=scheduler)
    parts["empty_ids"] = tokenize(tokenizer, [""])[0]
    parts["text_embeddings"] = None if text_params else TextEmbeddingCache(text_encoder)
    trained = [unet, text_encoder] if text_params else [unet]
    clip_params = unet_params + text_params

    def evaluate() -> float | None:
        """Held-out loss of the current weights (the EMA weights when EMA is on)."""
        if heldout_moments is None:
            return None
        model, encoder = accelerator.unwrap_model(unet), accelerator.unwrap_model(text_encoder)
        with ema.swapped() if ema is not None else contextlib.nullcontext(), accelerator.autocast():
            return heldout_loss_from_moments(
                model, encoder, tokenizer, scheduler, *heldout_moments, heldout.captions,
                seed, vae.config.scaling_factor,
            )  # fmt: skip

    def render(step: int) -> None:
        if not settings["validation_prompts"]:
            return
        from idc_diffusion.train.validation import save_validation_grid

        view = SimpleNamespace(
            unet=accelerator.unwrap_model(unet), vae=vae, tokenizer=tokenizer,
            text_encoder=accelerator.unwrap_model(text_encoder), scheduler=pipeline.scheduler,
        )  # fmt: skip
        with ema.swapped() if ema is not None else contextlib.nullcontext(), accelerator.autocast():
            path = save_validation_grid(
                view, settings["validation_prompts"], out_dir, step,
                settings["validation_images_per_prompt"], seed,
                settings["validation_inference_steps"], settings["validation_guidance_scale"],
            )  # fmt: skip
        log.info("validation images: %s", path)

    loss_base = None
    if accelerator.is_main_process:
        loss_base = evaluate()
        log.info("held-out loss of the base model (%s, %d images): %s", heldout.name,
                 len(heldout), loss_base)  # fmt: skip

    root = out_dir / "checkpoints"
    print_ = ckpt.fingerprint(
        settings, {"data": split_fingerprint(train_split), "resolution": resolution}
    )
    layout = {"processes": accelerator.num_processes}
    start_step, seconds_before, folder = 0, 0.0, None
    if accelerator.is_main_process:
        resume_point(settings, root, print_, cleanup=True)  # every process checks, below
    accelerator.wait_for_everyone()
    found = resume_point(settings, root, print_, layout, cleanup=False)
    if found is not None:
        start_step, folder, info = found
        accelerator.load_state(str(folder))
        seconds_before = float(info.get("seconds", 0.0))
        log.info("resuming from %s (step %d)", folder.name, start_step)
    log_path = out_dir / LOG_NAME
    board = None
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        restore_log(log_path, folder)
        board = open_tensorboard(out_dir / "tensorboard")

    batch_size = settings["train_batch_size"]
    effective = batch_size * accelerator.num_processes * accumulation
    log.info(
        "mode %s%s, attention %s, precision %s; effective batch %d = %d per device x %d "
        "devices x %d accumulation; TensorBoard: %s",
        settings["mode"], " + text encoder" if text_params else "", attention,
        accelerator.mixed_precision, effective, batch_size, accelerator.num_processes,
        accumulation, "on" if board else "off (tensorboard not importable)",
    )  # fmt: skip
    stream = BatchStream(
        len(train_split),
        batch_size,
        seed,
        start=start_step * accumulation,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    batches = iter(make_loader(dataset, stream, settings["dataloader_workers"]))

    stepper = Stepper(
        accelerator, parts, settings, optimizer, lr_scheduler, trained, clip_params,
        latent_shape(vae, resolution), ema, root,
    )  # fmt: skip
    loop_start = time.perf_counter()
    tick = (loop_start, start_step)
    max_steps, validation_steps = settings["max_steps"], settings["validation_steps"]
    budget = ckpt.TimeBudget(ckpt.slurm_end_time(), settings["stop_margin_seconds"])
    if budget.end is not None:
        log.info("SLURM job ends at %s: checkpointing and stopping before it",
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(budget.end)))  # fmt: skip
    with ckpt.StopSignals() as signals:
        for step in range(start_step, max_steps):
            step_started = time.perf_counter()
            losses = stepper(batches, step)
            done = step + 1
            seconds = seconds_before + time.perf_counter() - loop_start
            record = {
                "step": done,
                "epoch": epoch_of(len(train_split), batch_size * accelerator.num_processes,
                                  step * accumulation),
                "loss": sum(losses) / len(losses),
                "lr": lr_scheduler.get_last_lr()[0],
                "seconds": round(seconds, 4),
            }  # fmt: skip
            if validation_steps and (done % validation_steps == 0 or done == max_steps):
                if accelerator.is_main_process:
                    record["val_loss"] = evaluate()
                    render(done)
                accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with log_path.open("a", encoding="utf-8") as handle:
                    handle.write(json.dumps(record) + "\n")
                if board is not None:
                    for key in ("loss", "lr", "val_loss"):
                        if record.get(key) is not None:
                            board.add_scalar(f"train/{key}", record[key], done)
            if done % LOG_EVERY == 0 or done == max_steps:
                rate = (done - tick[1]) / max(time.perf_counter() - tick[0], 1e-9)
                tick = (time.perf_counter(), done)
                log.info("step %d/%d loss %.4f lr %.3g %.2f it/s", done, max_steps,
                         record["loss"], record["lr"], rate)  # fmt: skip
            budget.step_took(time.perf_counter() - step_started)
            spent = ckpt.BUDGET_STOP if budget.spent(time.time()) else 0
            signum = stop_signal(accelerator, signals.signum or spent)
            if done % settings["checkpointing_steps"] == 0 or done == max_steps or signum:
                saving = time.perf_counter()
                accelerator.wait_for_everyone()
                folder = root / f"{ckpt.PREFIX}{done}"
                if accelerator.is_main_process:
                    info = {"fingerprint": print_, "layout": layout, "seconds": seconds}
                    if signum and done < max_steps:  # why this run stops here, and its exit
                        info["stop"] = {"reason": stop_reason(signum), "exit_code": 128 + signum}
                    folder = ckpt.save_checkpoint(accelerator, root, done, info)
                    shutil.copyfile(log_path, folder / LOG_NAME)
                    ckpt.prune_checkpoints(root, settings["checkpoints_total_limit"])
                    log.info("saved %s", folder.name)
                accelerator.wait_for_everyone()
                budget.checkpoint_took(time.perf_counter() - saving)
            if signum and done < max_steps:
                log.warning("stop code %d (%s): stopping after step %d; resume continues from "
                            "%s", signum, stop_reason(signum), done, folder)  # fmt: skip
                if board is not None:
                    board.close()
                end_distributed(accelerator)
                raise TrainingInterrupted(signum, done, folder)

    accelerator.wait_for_everyone()
    loss_final = None
    if accelerator.is_main_process:
        loss_final = evaluate()
        log.info("held-out loss: base %s -> fine-tuned %s", loss_base, loss_final)
    summary = {
        "heldout_loss_base": loss_base,
        "heldout_loss_final": loss_final,
        "heldout_split": heldout.name,
        "heldout_images": len(heldout),
        "steps": max_steps,
        "prediction_type": prediction_type,
        "base_model": settings["base_model"],
        "resolution": resolution,
        "train_images": len(train_split),
        "effective_batch_size": effective,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 3),
        "pixel_source": sorted(set(train_split.pixel_sources)),
    }
    summary.update(
        mode=settings["mode"],
        train_text_encoder=bool(text_params),
        ema=ema is not None,
        latent_cache=str(cache_root) if cache_root else None,
        hardware=hardware(accelerator),
        mixed_precision=accelerator.mixed_precision,
    )
    if accelerator.is_main_process:
        if ema is not None:
            ema.copy_to()
        models = {}
        if weight_dtype != torch.float32:  # frozen parts were cast: save the base's own
            base = load_base_pipeline(
                base_spec, settings["revision"], settings["tiny_seed"], resolution
            )
            models.update(vae=base.vae, text_encoder=base.text_encoder)
        models["unet"] = accelerator.unwrap_model(unet)
        if text_params:
            models["text_encoder"] = accelerator.unwrap_model(text_encoder)
        save_outputs(pipeline, models, summary, settings, provenance, out_dir)
        if board is not None:
            board.close()
    end_distributed(accelerator)
    return summary


# Seconds the ranks wait, with the GIL released, before their process group can be torn down
SETTLE_SECONDS = 1.0


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


def non_finite_message(value: float, step: int, micro: int, root: Path | None) -> str:
    """What to tell the user when the loss is NaN/inf at `step`."""
    found = ckpt.list_checkpoints(root) if root is not None else []
    last = f"{found[-1][1]} (step {found[-1][0]})" if found else "none (no checkpoint yet)"
    return (
        f"training loss is {value} at step {step} (micro-batch {micro}); stopped without "
        f"saving this step. Last good checkpoint: {last}. Lower train.learning_rate, use "
        "mixed_precision bf16 instead of fp16, or check the training images."
    )


def save_outputs(
    pipeline: Any,
    models: Mapping[str, torch.nn.Module],
    summary: Mapping[str, Any],
    settings: Mapping[str, Any],
    provenance: Mapping[str, Any] | None,
    out_dir: Path,
) -> None:
    """The fine-tuned pipeline (safetensors, float32), train_summary.json and, with
    `provenance`, model_card.md.

    `models` replace the pipeline's parts of the same name (the trained ones, and the
    base's float32 frozen parts when training cast them).

    In LoRA mode the adapters are also saved alone (``pytorch_lora_weights.safetensors``,
    for ``load_lora_weights`` on the base model) and fused into the saved pipeline.
    """
    for name, model in models.items():
        setattr(pipeline, name, model)
    if settings.get("mode") == "lora":
        from idc_diffusion.train.lora import fuse_and_unload, save_lora

        text = models["text_encoder"] if settings.get("train_text_encoder") else None
        save_lora(out_dir, pipeline.unet, text)
        fuse_and_unload(pipeline)
    for part in (pipeline.unet, pipeline.vae, pipeline.text_encoder):
        part.to("cpu", torch.float32)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=_json), "utf-8")
    if provenance is not None:
        (out_dir / CARD_NAME).write_text(render_model_card(summary, settings, provenance), "utf-8")


def _json(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


__all__ = [
    "TINY",
    "NonFiniteLoss",
    "TrainingInterrupted",
    "diffusion_loss",
    "draw_noise",
    "heldout_loss",
    "prediction_target",
    "train",
]
