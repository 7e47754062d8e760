"""Fine-tune a Stable Diffusion UNet on the imagefolder dataset (diffusers + accelerate).

The recipe of diffusers' ``train_text_to_image.py`` in small parts: the VAE and the text
encoder are frozen, latents are re-encoded every step, the UNet learns the scheduler's
prediction target (epsilon or v) under MSE with AdamW. Added: a deterministic, resumable
data and noise order (a resumed run equals an uninterrupted one), settings-fingerprinted
checkpoints, and a held-out loss of the base and the fine-tuned UNet on the same images,
noise and timesteps.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler

from idc_diffusion import checkpoints as ckpt
from idc_diffusion.model_card import render_model_card
from idc_diffusion.models import TINY, load_base_pipeline
from idc_diffusion.train_data import (
    BatchStream,
    CaptionedImages,
    Split,
    epoch_of,
    image_resolution,
    load_images,
    make_loader,
    read_split,
    split_fingerprint,
    tokenize,
)

log = logging.getLogger(__name__)

LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "train_summary.json"
CARD_NAME = "model_card.md"
PREDICTION_TYPES = ("epsilon", "v_prediction")
LOG_EVERY = 10


# --------------------------------------------------------------------------- diffusion loss


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (well mixed by numpy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & (2**63 - 1))


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
    """The denoising MSE of `unet` on one batch, given its noise `draws` (see draw_noise).

    Latents are a VAE posterior sample times the VAE's scaling factor; the noise lands on
    the batch's device, so the same draws give the same loss on any device.
    """
    device, dtype = pixel_values.device, vae.dtype
    eps, noise, timesteps = (t.to(device) for t in draws)
    with torch.no_grad():
        posterior = vae.encode(pixel_values.to(dtype)).latent_dist
        latents = (posterior.mean + posterior.std * eps.to(dtype)) * vae.config.scaling_factor
        noise = noise.to(dtype)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(scheduler, latents, noise, timesteps)
        hidden = text_encoder(input_ids.to(device), return_dict=False)[0]
    pred = unet(noisy, timesteps, hidden, return_dict=False)[0]
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    return loss.mean() if reduction == "mean" else loss


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
    """Mean denoising loss on `images` with fixed noise and timesteps.

    Image i's noise and timestep come from a generator seeded by (seed, i), so two UNets
    evaluated with the same arguments see identical latents, noise and timesteps, whatever
    the batch size.
    """
    if len(images) == 0:
        return float("nan")
    shape = latent_shape(vae, images.shape[-1])
    steps = scheduler.config.num_train_timesteps
    per_image = [
        draw_noise(seeded_generator(seed, 0xE7A1, i), 1, shape, steps) for i in range(len(images))
    ]
    input_ids = tokenize(tokenizer, captions)
    device = next(unet.parameters()).device
    was_training = unet.training
    unet.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                chunk = slice(start, start + batch_size)
                draws = tuple(torch.cat(parts) for parts in zip(*per_image[chunk], strict=True))
                losses = diffusion_loss(
                    unet, vae, text_encoder, scheduler,
                    images[chunk].to(device), input_ids[chunk], draws, reduction="none",
                )  # fmt: skip
                total += float(losses.sum())
    finally:
        unet.train(was_training)
    return total / len(images)


# --------------------------------------------------------------------------- setup helpers


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


def resume_point(
    settings: Mapping[str, Any], root: Path, print_: str, cleanup: bool = True
) -> tuple[int, Path, dict] | None:
    """The checkpoint to continue from; None: start over (`cleanup` deletes stale ones)."""
    if settings["resume"] == "never":
        if cleanup:
            ckpt.delete_all(root)
        return None
    return ckpt.latest_compatible(root, print_, settings["max_steps"], cleanup)


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


# --------------------------------------------------------------------------- training


def train(settings: dict, data_dir: Path, out_dir: Path, provenance: dict) -> dict:
    """Fine-tune the base model's UNet; write the pipeline, log, summary and card to out_dir.

    Returns the train summary (also written to ``out_dir/train_summary.json``).
    """
    started = time.perf_counter()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    train_split, heldout, resolution = load_splits(settings, data_dir)
    seed, accumulation = settings["seed"], settings["gradient_accumulation_steps"]
    accelerator = Accelerator(
        gradient_accumulation_steps=accumulation, mixed_precision=settings["mixed_precision"]
    )
    torch.manual_seed(seed)

    pipeline = load_base_pipeline(
        settings["base_model"], settings["revision"], settings["tiny_seed"], resolution
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

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
        accelerator.mixed_precision, torch.float32
    )
    device = accelerator.device
    for frozen in (vae, text_encoder):
        frozen.requires_grad_(False).eval()
        frozen.to(device) if weight_dtype == frozen.dtype else frozen.to(device, weight_dtype)
    unet.to(device)

    heldout_images = load_images(heldout.paths) if len(heldout) else torch.empty(0)

    def evaluate(model: torch.nn.Module) -> float | None:
        if not len(heldout):
            return None
        with accelerator.autocast():
            value = heldout_loss(
                model, vae, text_encoder, tokenizer, scheduler,
                heldout_images, heldout.captions, seed,
            )  # fmt: skip
        return value

    loss_base = evaluate(unet)
    log.info("held-out loss of the base UNet (%s, %d images): %s", heldout.name, len(heldout),
             loss_base)  # fmt: skip

    unet.train()
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=settings["learning_rate"],
        betas=(settings["adam_beta1"], settings["adam_beta2"]),
        weight_decay=settings["adam_weight_decay"],
        eps=settings["adam_epsilon"],
    )
    lr_scheduler = make_lr_scheduler(settings, optimizer, accelerator.num_processes)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)

    root = out_dir / "checkpoints"
    print_ = ckpt.fingerprint(
        settings, {"data": split_fingerprint(train_split), "resolution": resolution}
    )
    start_step, seconds_before, folder = 0, 0.0, None
    if accelerator.is_main_process:
        resume_point(settings, root, print_, cleanup=True)
    accelerator.wait_for_everyone()
    found = resume_point(settings, root, print_, cleanup=False)
    if found is not None:
        start_step, folder, info = found
        accelerator.load_state(str(folder))
        seconds_before = float(info.get("seconds", 0.0))
        log.info("resuming from %s (step %d)", folder.name, start_step)
    log_path = out_dir / LOG_NAME
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        restore_log(log_path, folder)

    input_ids = tokenize(tokenizer, train_split.captions)
    batch_size = settings["train_batch_size"]
    stream = BatchStream(
        len(train_split),
        batch_size,
        seed,
        start=start_step * accumulation,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
    )
    batches = iter(
        make_loader(CaptionedImages(train_split, input_ids), stream, settings["dataloader_workers"])
    )

    shape = latent_shape(vae, resolution)
    num_timesteps = scheduler.config.num_train_timesteps
    loop_start = time.perf_counter()
    tick = (loop_start, start_step)
    for step in range(start_step, settings["max_steps"]):
        losses = []
        for micro in range(accumulation):
            batch = next(batches)
            index = step * accumulation + micro
            pixels = batch["pixel_values"].to(device)
            generator = seeded_generator(seed, index, accelerator.process_index)
            draws = draw_noise(generator, len(pixels), shape, num_timesteps)
            with accelerator.accumulate(unet), accelerator.autocast():
                loss = diffusion_loss(
                    unet, vae, text_encoder, scheduler,
                    pixels, batch["input_ids"], draws,
                )  # fmt: skip
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(unet.parameters(), settings["max_grad_norm"])
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            losses.append(float(accelerator.gather(loss.detach()).mean()))
        done = step + 1
        seconds = seconds_before + time.perf_counter() - loop_start
        record = {
            "step": done,
            "epoch": epoch_of(len(train_split), batch_size * accelerator.num_processes,
                              step * accumulation),
            "loss": sum(losses) / len(losses),
            "lr": lr_scheduler.get_last_lr()[0],
            "seconds": round(seconds, 3),
        }  # fmt: skip
        if accelerator.is_main_process:
            with log_path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        if done % LOG_EVERY == 0 or done == settings["max_steps"]:
            rate = (done - tick[1]) / max(time.perf_counter() - tick[0], 1e-9)
            tick = (time.perf_counter(), done)
            log.info("step %d/%d loss %.4f lr %.3g %.2f it/s", done, settings["max_steps"],
                     record["loss"], record["lr"], rate)  # fmt: skip
        if done % settings["checkpointing_steps"] == 0 or done == settings["max_steps"]:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                folder = ckpt.save_checkpoint(
                    accelerator, root, done, {"fingerprint": print_, "seconds": seconds}
                )
                shutil.copyfile(log_path, folder / LOG_NAME)
                ckpt.prune_checkpoints(root, settings["checkpoints_total_limit"])
                log.info("saved %s", folder.name)

    accelerator.wait_for_everyone()
    final_unet = accelerator.unwrap_model(unet)
    loss_final = evaluate(final_unet)
    log.info("held-out loss: base %s -> fine-tuned %s", loss_base, loss_final)
    summary = {
        "heldout_loss_base": loss_base,
        "heldout_loss_final": loss_final,
        "heldout_split": heldout.name,
        "heldout_images": len(heldout),
        "steps": settings["max_steps"],
        "prediction_type": prediction_type,
        "base_model": settings["base_model"],
        "resolution": resolution,
        "train_images": len(train_split),
        "effective_batch_size": batch_size * accumulation * accelerator.num_processes,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 3),
        "pixel_source": sorted(set(train_split.pixel_sources)),
    }
    if accelerator.is_main_process:
        save_outputs(pipeline, final_unet, summary, settings, provenance, out_dir)
    accelerator.end_training()
    return summary


def save_outputs(
    pipeline: Any,
    unet: torch.nn.Module,
    summary: Mapping[str, Any],
    settings: Mapping[str, Any],
    provenance: Mapping[str, Any],
    out_dir: Path,
) -> None:
    """The fine-tuned pipeline (safetensors, float32), train_summary.json and model_card.md."""
    pipeline.unet = unet
    pipeline.unet.to("cpu")
    for part in (pipeline.vae, pipeline.text_encoder):
        part.to("cpu") if part.dtype == torch.float32 else part.to("cpu", torch.float32)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / SUMMARY_NAME).write_text(json.dumps(summary, indent=1, default=_json), "utf-8")
    (out_dir / CARD_NAME).write_text(render_model_card(summary, settings, provenance), "utf-8")


def _json(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    return str(value)


__all__ = [
    "TINY",
    "diffusion_loss",
    "draw_noise",
    "heldout_loss",
    "prediction_target",
    "train",
]
